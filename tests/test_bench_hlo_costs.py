"""bench/hlo_costs.py's HLO accounting, checked on programs whose data movement is known in closed form."""

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is scripts, not installed
from bench import hlo_costs as H  # noqa: E402


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_tuple_shaped_instruction_is_parsed():
    line = (
        "  %while.7 = (s32[], f32[8,1,64]{2,1,0}, /*index=2*/f32[2,64]{1,0}) while(%tuple.3), "
        "condition=%cond.1, body=%body.2"
    )
    name, shape, op, rest = H.parse_instruction(line)
    assert (name, op) == ("%while.7", "while")
    assert H.shape_bytes(shape) == 4 + 8 * 64 * 4 + 2 * 64 * 4
    assert H._called(rest, "body") == "%body.2"


def test_layer_scan_trip_count_and_weight_slices_per_layer():
    """A scan over L stacked [n, n] weights: the loop runs L times, and XLA:CPU copies each layer's weight
    out of the stack before its dot (the cost the benchmark's README names): L * n * n * 4 bytes."""
    layers, n = 5, 96

    def f(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    hlo = _compiled_text(f, jnp.ones((layers, n, n)), jnp.ones((8, n)))
    comps = H.computations(hlo)
    whiles = [rest for _, _, op, rest in comps["ENTRY"] if op == "while"]
    assert [H.trip_count(comps, r) for r in whiles] == [layers]
    moved = H.moved_bytes(comps, "ENTRY")
    assert moved["dynamic-slice"] == layers * n * n * 4


def test_fused_elementwise_work_is_not_counted_as_movement():
    hlo = _compiled_text(lambda a, b: jnp.exp(a) * b + 1.0, jnp.ones((64, 64)), jnp.ones((64, 64)))
    assert sum(H.moved_bytes(H.computations(hlo), "ENTRY").values()) == 0


def test_transpose_feeding_nothing_but_output_is_counted():
    hlo = _compiled_text(lambda a: jnp.swapaxes(a, 0, 1) + 0.0, jnp.ones((64, 32)))
    moved = H.moved_bytes(H.computations(hlo), "ENTRY")
    assert sum(moved.values()) == 64 * 32 * 4
