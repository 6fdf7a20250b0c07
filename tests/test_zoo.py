"""End-to-end checks of the model zoo on the real models.

A cold run downloads the pinned wheels (~230 MB) and exports the four models (about 2-3 minutes
on 2 cores); later runs use the cache (``$ONNXQ_CACHE`` or ``~/.cache/onnxq``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.zoo

torch = pytest.importorskip(
    "torch", reason="the model zoo exports PyTorch models; install onnxq[zoo] (torch==2.13.0 CPU)"
)

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

from onnxq import zoo  # noqa: E402
from onnxq.errors import ZooError  # noqa: E402
from onnxq.runtime.ort import create_session, input_spec  # noqa: E402
from onnxq.zoo import _fetch  # noqa: E402
from onnxq.zoo.efficientnet import EfficientNetLite0  # noqa: E402
from onnxq.zoo.minilm import MiniLM  # noqa: E402
from onnxq.zoo.smollm2 import SmolLM2  # noqa: E402

NAMES = ["minilm-l6-v2", "efficientnet-lite0", "smollm2-135m", "smollm2-6l"]

# New, un-cached instances: determinism must not come from an in-memory cache.
FRESH = {
    "minilm-l6-v2": MiniLM,
    "efficientnet-lite0": EfficientNetLite0,
    "smollm2-135m": SmolLM2,
    "smollm2-6l": lambda: SmolLM2(layers=6),
}


def _rows(arrays: dict[str, np.ndarray]) -> set[bytes]:
    """One fingerprint per sample, over all inputs."""
    n = len(next(iter(arrays.values())))
    return {b"".join(np.ascontiguousarray(arrays[k][i]).tobytes() for k in sorted(arrays)) for i in range(n)}


@pytest.fixture(scope="module")
def sessions():
    cache: dict[str, object] = {}

    def get(name):
        if name not in cache:
            cache[name] = create_session(zoo.get(name).onnx_path())
        return cache[name]

    return get


def test_registry():
    assert zoo.names() == NAMES
    for name in NAMES:
        m = zoo.get(name)
        assert m.name == name and m.description and m.inputs and len(m.outputs) == 1
    with pytest.raises(ZooError) as err:
        zoo.get("resnet-50")
    assert all(name in str(err.value) for name in NAMES)


def test_fetch_failure_is_actionable(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXQ_CACHE", str(tmp_path))
    monkeypatch.setattr(_fetch.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(ZooError, match="pip download .*ONNXQ_CACHE"):
        _fetch.fetch_wheel("foolbox", "3.3.4")
    assert not (tmp_path / "pkgs" / "foolbox-3.3.4").exists()


def test_fetch_wheel_reads_pinned_files():
    folder = _fetch.fetch_wheel("foolbox", "3.3.4")
    assert folder == _fetch.cache_dir() / "pkgs" / "foolbox-3.3.4"
    assert len(list((folder / "foolbox" / "data").glob("imagenet_*.jpg"))) == 20
    assert _fetch.fetch_wheel("foolbox", "3.3.4") == folder  # cached: no second unpack


@pytest.mark.parametrize("name", NAMES)
def test_export_is_cached_and_clean(name):
    m = zoo.get(name)
    path = m.onnx_path()
    assert path == _fetch.cache_dir() / "models" / name / "model.onnx" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert m.onnx_path() == path and path.stat().st_mtime_ns == mtime  # not exported again

    info = m.export_info()
    assert info["exporter"] in ("dynamo", "torchscript")
    assert info["ort_vs_torch_cosine"] > 0.9999

    proto = onnx.load(str(path), load_external_data=False)
    assert proto.ir_version <= 10
    assert {o.domain: o.version for o in proto.opset_import}.get("", 0) >= 17
    assert [i.name for i in proto.graph.input] == list(m.inputs)
    assert [o.name for o in proto.graph.output] == list(m.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_data_disjoint_deterministic_and_feeds(name, sessions):
    m = zoo.get(name)
    calib, evals = m.calib_data(), m.eval_data()
    assert len(calib[m.inputs[0]]) == m.default_calib
    assert len(evals[m.inputs[0]]) == m.default_eval
    for data in (calib, evals):
        assert sorted(data) == sorted(m.inputs)
        assert len({len(a) for a in data.values()}) == 1

    fresh = FRESH[name]()
    for a, b in ((calib, fresh.calib_data()), (evals, fresh.eval_data())):
        assert all(np.array_equal(a[k], b[k]) for k in m.inputs)
    assert not _rows(calib) & _rows(evals)
    assert len(_rows(evals)) == len(evals[m.inputs[0]])  # no duplicated eval sample

    sess = sessions(name)
    spec = input_spec(sess)
    for data in (calib, evals):
        for i in (0, len(data[m.inputs[0]]) - 1):
            feed = {k: v[i : i + 1] for k, v in data.items()}
            for k, (dtype, _) in spec.items():
                assert feed[k].dtype == dtype
            out = sess.run(None, feed)[0]
            assert out.shape[0] == 1 and np.isfinite(out).all()

    assert len(m.calib_data(3)[m.inputs[0]]) == 3
    with pytest.raises(ZooError):
        m.eval_data(10**6)


def test_minilm_metric():
    m = zoo.get("minilm-l6-v2")
    r = m.evaluate(m.onnx_path())
    assert r["n_pairs"] == 1225
    assert r["spearman_fp32"] > 0.5 and r["pearson_fp32"] > 0.6
    assert r["spearman"] == pytest.approx(r["spearman_fp32"], abs=1e-6)
    assert r["cosine_vs_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert m.eval_data()["input_ids"].shape == (50, 128)
    emb = create_session(m.onnx_path()).run(None, m.eval_data(2))[0]  # dynamic batch
    assert emb.shape == (2, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_efficientnet_metric():
    m = zoo.get("efficientnet-lite0")
    r = m.evaluate(m.onnx_path())
    assert r["n_labelled"] == 20
    assert r["top1_fp32"] >= 14 / 20
    assert r["top1"] == r["top1_fp32"] and r["top1_agreement"] == 1.0
    assert r["logit_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_smollm2_full_perplexity():
    m = zoo.get("smollm2-135m")
    r = m.evaluate(m.onnx_path(), n=2)
    assert r["n_windows"] == 2 and r["seq_len"] == 512
    assert 5 < r["perplexity_fp32"] < 30
    assert r["perplexity"] == pytest.approx(r["perplexity_fp32"], rel=1e-6)


def test_smollm2_truncated_agreement_and_kl(tmp_path):
    m = zoo.get("smollm2-6l")
    r = m.evaluate(m.onnx_path(), reference=m.onnx_path())
    assert r["top1_agreement"] == 1.0
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["seq_len"] == 128 and r["n_windows"] == 16

    # A perturbed candidate must show up in both metrics.
    model = ir.load(m.onnx_path())
    rng = np.random.default_rng(0)
    weights = [v for v in model.graph.initializers.values() if v.const_value is not None and len(v.shape) == 2
               and v.shape[0] == v.shape[1] == 576]
    for v in weights[:4]:
        w = v.const_value.numpy()
        v.const_value = ir.Tensor((w + rng.normal(0, 2 * w.std(), w.shape)).astype(w.dtype), name=v.name)
    from onnxq import modelio

    bad = modelio.save(model, tmp_path / "perturbed.onnx")
    r = m.evaluate(bad, n=4)
    assert r["kl"] > 1e-3 and r["top1_agreement"] < 1.0
    assert "perplexity" not in r  # meaningless for a truncated model


@pytest.mark.parametrize("name", NAMES)
def test_export_case(name, tmp_path):
    m = zoo.get(name)
    out = tmp_path / "case"
    paths = zoo.export_case(name, out, n_calib=3, n_eval=2)
    assert set(paths) == {"model", "calib", "eval"}
    assert sorted(p.name for p in out.iterdir()) == ["calib.npz", "eval.npz", "model.onnx"]
    spec = input_spec(create_session(paths["model"]))
    for key, count in (("calib", 3), ("eval", 2)):
        with np.load(paths[key]) as npz:
            assert sorted(npz.files) == sorted(spec)
            for k, (dtype, shape) in spec.items():
                arr = npz[k]
                assert arr.dtype == dtype and arr.shape[0] == count and arr.ndim == len(shape)
            ref = m.calib_data(3) if key == "calib" else m.eval_data(2)
            assert all(np.array_equal(npz[k], ref[k]) for k in m.inputs)
    assert os.stat(paths["model"]).st_size == os.stat(m.onnx_path()).st_size
    # Written again over an existing case: atomic replace, no temp files left behind.
    time.sleep(0.01)
    zoo.export_case(name, out, n_calib=3, n_eval=2)
    assert sorted(p.name for p in out.iterdir()) == ["calib.npz", "eval.npz", "model.onnx"]
