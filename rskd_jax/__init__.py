def __getattr__(name):  # lazy: `import rskd_jax.data` (Grain workers) must not pull in jax/flax/models
    if name == "load_pretrained":
        from rskd_jax.pretrained import load_pretrained  # noqa: PLC0415 (lazy, see above)

        return load_pretrained
    raise AttributeError(f"module 'rskd_jax' has no attribute {name!r}")
