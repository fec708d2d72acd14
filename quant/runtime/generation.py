"""Text generation and its speed, for float models and our checkpoints alike (``quantize generate``/``bench``).

``bench`` times the model itself, as llama.cpp's ``llama-bench`` does: one forward over the prompt (prefill;
time to first token is that forward and the pick of the first token), then one forward per new token with the
KV cache (decode), greedy, after an untimed warm-up that builds or loads the kernels and repacks the codes. With
``compiled``, the decode step runs ``torch.compile``'d over a static KV cache, as gpt-fast and transformers'
static-cache recipe do: the per-layer Python of an eager forward (most of a small model's decode time on a CPU)
goes away, and the packed linears are graph operators. On
the CPU, decoding-sized calls of packed linears go to the low-bit kernels (``kernels_cpu``); prefill uses
dequantize + matmul. Peak memory is the process's resident set high-water mark, reset after loading (Linux:
``/proc/self/clear_refs``), so it covers generation only; the load's own peak is reported beside it.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from quant.errors import QuantError
from quant.runtime.quantlinear import PackedLinear, QuantLinear


@dataclass
class SamplingConfig:
    """transformers' generation options: greedy unless ``do_sample``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        if self.temperature <= 0:
            raise QuantError(f"--temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise QuantError(f"--top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QuantError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise QuantError(f"--repetition-penalty must be positive, got {self.repetition_penalty}")

    def kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty}


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise QuantError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate(model: nn.Module, tokenizer, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
             streamer=None) -> tuple[torch.Tensor, float]:
    """New token ids (``[batch, n]``) and the seconds they took, through ``model.generate``."""
    sampling.validate()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prepared(model)  # before the clock: the codes are repacked once
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, streamer=streamer, **sampling.kwargs())
    return out[:, ids.shape[1]:], time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: the high-water mark since the last reset (VmHWM), else the process's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------- bytes
def decode_bytes(model: nn.Module) -> dict:
    """Bytes of weights one decoded token reads: every linear (packed codes with their scales and zeros, or the
    float weight), lm_head included; the embedding row, norms and KV cache are left out (small at these
    lengths). Packed uniform codes count as the kernel reads them (``bits`` per weight, no padding)."""
    total = head = 0
    lm_head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            n = m.in_features * m.out_features
            stored, b = m.storage_buffers(), 0
            if isinstance(m, QuantLinear):  # the codes as the kernel reads them, not rowpack's padded words
                stored, b = stored[1:], n * m.bits // 8
            b += sum(t.numel() * t.element_size() for t in stored)
        elif isinstance(m, nn.Linear):
            b = m.weight.numel() * m.weight.element_size()
        else:
            continue
        total += b
        head += b if m is lm_head else 0
    return {"bytes_per_token": total, "lm_head_bytes": head}


def head_kind(model: nn.Module) -> str:
    """How lm_head is stored, for every benchmark row: "int4 g64", "fp32 (tied)", ..."""
    h = model.get_output_embeddings()
    if isinstance(h, PackedLinear):
        if isinstance(h, QuantLinear):
            return f"int{h.bits} g{h.group_size}" + (" (8-bit scales)" if h.FORMAT == "uniform-dq8" else "")
        return f"{h.FORMAT}{h.bits}"
    if not isinstance(getattr(h, "weight", None), torch.Tensor):
        return type(h).__name__
    tied = h.weight is model.get_input_embeddings().weight
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(h.weight.dtype, str(h.weight.dtype)) + (" (tied)" if tied else "")


# --------------------------------------------------------------------------------------------- bench
def bench_prompt(tokenizer, tokens: int, batch: int) -> torch.Tensor:
    """``batch`` different prompts of exactly ``tokens`` tokens: consecutive slices of the WikiText-2 test text."""
    from calibrate.data import eval_text

    ids = tokenizer(eval_text()[: 8 * tokens * batch + 1000], return_tensors="pt").input_ids[0]
    if ids.numel() < tokens * batch:
        raise QuantError(f"the prompt text is too short for {batch} x {tokens} tokens")
    return ids[: tokens * batch].view(batch, tokens)


def prepared(model: nn.Module) -> nn.Module:
    """``model`` with its packed linears readied for decoding on the CPU, once per model
    (``kernels_cpu.dispatch.prepare_for_decode``: one kernel call a layer, q/k/v and gate/up fused, no per-call
    checks; 1.2x faster eager decoding of SmolLM2 INT4 in a probe). Its weights are fixed for decoding from here on."""
    if "_lowbit_prepared" not in model.__dict__:
        if next(model.parameters()).device.type == "cpu":
            from kernels_cpu.dispatch import prepare_for_decode

            prepare_for_decode(model)
        model.__dict__["_lowbit_prepared"] = True
    return model


def _compiled_forward(model: nn.Module):
    """``model.forward`` compiled once per model (static shapes: one graph per batch size and cache length), with
    the packed linears' kernels (:func:`prepared`) and the decode attention (``kernels_cpu.attention``) as graph
    operators."""
    if "_lowbit_compiled" not in model.__dict__:
        from kernels_cpu.attention import use_decode_attention

        prepared(model)
        if next(model.parameters()).device.type == "cpu":
            use_decode_attention(model)
        # no size asserts: the graph checked its ~800 inputs' sizes and strides on every step (4% of a SmolLM2 step),
        # which dynamo's guards already do (bench skips them only for steps of the shapes it compiled)
        model.__dict__["_lowbit_compiled"] = torch.compile(model.forward, dynamic=False,
                                                           options={"size_asserts": False})
    return model.__dict__["_lowbit_compiled"]


def cache_kwarg(model: nn.Module) -> str:
    """The name of ``model.forward``'s KV-cache argument: transformers renamed ``past_key_values`` to ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Greedy:
    """One greedy decode of ``model`` from ``ids``: :meth:`prefill`, then one :meth:`step` per new token.
    ``compiled``: the steps run ``torch.compile``'d on a static cache of ``max_len`` positions (prefill stays eager)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, new_tokens: int, compiled: bool, max_len: int = 0):
        import inspect

        from transformers import DynamicCache, StaticCache

        params = inspect.signature(model.forward).parameters
        # only the last position's logits: a 256-token prefill would otherwise compute 256 rows of the vocabulary
        self.last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.kv = cache_kwarg(model)
        self.model, self.ids, self.compiled, self.n = model, ids, compiled, ids.shape[1]
        self.cache = (StaticCache(config=model.config, max_cache_len=max_len or self.n + new_tokens) if compiled
                      else DynamicCache())
        self.forward = _compiled_forward(model) if compiled else prepared(model)
        self.toks: list[torch.Tensor] = []

    def _next(self, fwd, ids: torch.Tensor, start: int) -> None:
        pos = {"cache_position": torch.arange(start, start + ids.shape[1])} if self.compiled else {}
        out = fwd(input_ids=ids, **{self.kv: self.cache}, use_cache=True, **self.last, **pos)
        self.toks.append(out.logits[:, -1].argmax(-1, keepdim=True))

    def prefill(self) -> None:
        self._next(self.model, self.ids, 0)

    def step(self) -> None:
        self._next(self.forward, self.toks[-1], self.n + len(self.toks) - 1)


def timed_run(model: nn.Module, ids: torch.Tensor, new_tokens: int, compiled: bool = False, max_len: int = 0,
              warm: bool = False) -> dict:
    """Greedy: one prefill forward, then ``new_tokens - 1`` single-token forwards with the cache. ``compiled``: the
    single-token forwards run ``torch.compile``'d on a static cache of ``max_len`` positions (prefill stays eager);
    ``warm``: a run with those shapes has compiled the step already."""
    run = _Greedy(model, ids, new_tokens, compiled, max_len)
    t0 = time.perf_counter()
    run.prefill()
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    # warm: every step has the shapes of the run that compiled it, so the guards need not be re-checked (they cost
    # ~3 ms a step on SmolLM2: one per parameter)
    with torch.compiler.set_stance(skip_guard_eval_unsafe=compiled and warm):
        for _ in range(new_tokens - 1):
            run.step()
    decode = time.perf_counter() - t1
    batch, n = ids.shape
    return {"ttft_s": ttft, "prefill_tok_s": batch * n / ttft,
            "decode_tok_s": batch * (new_tokens - 1) / decode if new_tokens > 1 else None,
            "tokens": torch.cat(run.toks, 1)}


def interleaved_decode(models: dict[str, nn.Module], ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Decode tokens/s of each compiled model (warm: a ``timed_run`` of these shapes has compiled it), their steps
    interleaved token by token in an order that rotates every step: a slow spell of a shared machine, seconds
    long, falls on every model alike instead of on whichever one it ran in."""
    runs = {k: _Greedy(m, ids, new_tokens, True) for k, m in models.items()}
    spent = dict.fromkeys(runs, 0.0)
    names = list(runs)
    for r in runs.values():
        r.prefill()
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        for i in range(new_tokens - 1):
            for k in names[i % len(names):] + names[: i % len(names)]:
                t0 = time.perf_counter()
                runs[k].step()
                spent[k] += time.perf_counter() - t0
    return {k: ids.shape[0] * (new_tokens - 1) / t for k, t in spent.items()}


def bench(model: nn.Module, tokenizer, prompt_tokens: int = 256, new_tokens: int = 128,
          batches: tuple[int, ...] = (1, 4), repeats: int = 1, compiled: bool = False) -> dict:
    """Prefill and decode speed, time to first token and peak memory at each batch size; with ``repeats`` timed
    runs per batch size, the run of median decode speed is reported. ``compiled``: decode steps through
    ``torch.compile`` (the compile is timed apart, as ``compile_s``)."""
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1 or not batches or min(batches) < 1:
        raise QuantError("--prompt-tokens, --new-tokens, --repeats and every --batch must be at least 1")
    model.eval()
    rows = {}
    with torch.inference_mode():
        timed_run(model, bench_prompt(tokenizer, 16, 1), 4)  # warm-up: kernels built or loaded, codes repacked
        for b in batches:
            ids = bench_prompt(tokenizer, prompt_tokens, b)
            extra = {}
            if compiled:  # the same shapes as the timed runs: the graph is compiled here, not inside them
                t0 = time.perf_counter()
                timed_run(model, ids, 3, True, prompt_tokens + new_tokens)
                extra["compile_s"] = round(time.perf_counter() - t0, 1)
            reset = reset_peak_rss()
            runs = sorted((timed_run(model, ids, new_tokens, compiled, warm=True) for _ in range(repeats)),
                          key=lambda r: r["decode_tok_s"] or r["prefill_tok_s"])
            rows[str(b)] = {**{k: round(v, 4) for k, v in runs[len(runs) // 2].items() if isinstance(v, float)},
                            **extra, "peak_rss_bytes": peak_rss(), "peak_rss_since_load": reset}
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "compiled": compiled, "lm_head": head_kind(model), **decode_bytes(model), "batches": rows,
            "kernels": os.environ.get("LOWBIT_KERNELS", "1") != "0"}
