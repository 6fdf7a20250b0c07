"""Task metric plug-ins for the tests (``--metric metric_plugin:output_error``): what a user's
metric function looks like. It scores the candidate's first output against the reference's on
seeded random inputs, so the tests can recompute it on any model the CLI wrote."""

import numpy as np

from onnxq.runtime import ort as ort_rt


def output_error(candidate: str, reference: str, samples: int | None = None) -> dict[str, float]:
    cand, ref = ort_rt.create_session(candidate), ort_rt.create_session(reference)
    rng = np.random.default_rng(0)
    spec = ort_rt.input_spec(ref)
    worst = agree = rows = 0.0
    for _ in range(samples or 4):
        feed = {name: rng.normal(size=[d if isinstance(d, int) else 1 for d in shape]).astype(dtype) for name, (dtype, shape) in spec.items()}
        c, r = ort_rt.run(cand, feed)[0], ort_rt.run(ref, feed)[0]
        worst = max(worst, float(np.abs(c - r).max()))
        agree += float((c.argmax(-1) == r.argmax(-1)).sum())
        rows += r[..., 0].size
    return {"max_abs_error": worst, "argmax_agreement": agree / rows}


output_error.lower_is_better = ("max_abs_error",)


def not_a_mapping(candidate, reference, samples=None):
    return 0.5


def raises(candidate, reference, samples=None):
    raise RuntimeError("the evaluation server is down\nsecond line")
