"""Evaluation: task scorers (metrics), box strings and IoU (boxes), reports (report), figures (plots) and
parameter / FLOPs accounting (flops). Generation lives elsewhere; everything here is model-independent.

Submodules are imported lazily by their users (``from rskd_jax.eval import metrics``) so that importing the
package does not pull in matplotlib, scipy or the METEOR JVM.
"""
