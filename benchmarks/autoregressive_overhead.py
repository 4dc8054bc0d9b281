"""Cost of the autoregressive reconstruction module: time, FLOPs, memory; shared vs copy target encoder.

Shape (LLaVA-OneVision-0.5B on a 16-frame video): LLM hidden 896, 16 frames, 14x14 = 196 tokens per frame
(SigLIP-so400m's 27x27 grid, bilinear stride 2), embedding 1152, batch 1, the default predictor
(3 layers, 8 heads, num_hist 3). Measured, windows interleaved over ``--rounds`` rounds:

- forward+backward wall time of ``compute_autoregressive_loss`` for ``window="sliding"`` (one
  banded frame-causal pass, every frame supervised once; chunked attention, and the dense mask as
  the kernel's peer), ``"all"`` (every window of ``num_hist + 1`` frames) and ``"random"``;
- FLOPs of that step counted by ``torch.utils.flop_counter.FlopCounterMode`` with a formula for the
  CPU flash-attention kernels registered (``lmms_engine.utils.flops``; torch has none, so attention
  used to count zero) -> achieved GFLOP/s, next to a peer measured in the same run: a plain GEMM of
  the predictor's token count x 1152 x 1152;
- the step it is added to, at real widths with layers cut for the CPU: one Qwen2-0.5B decoder layer
  forward+backward on the sequence, one SigLIP-so400m layer forward on the 16 frames, and the LM head
  + loss forward+backward, each timed in the same rounds; the full step is estimated as 24 LLM layers
  + 27 tower layers + the head, and the module's time is stated per LLM layer too;
- FLOPs of a Qwen2-0.5B forward+backward on the same sequence and of a SigLIP-so400m forward on the
  16 frames (counted on the meta device: nothing is allocated; attention included);
- peak memory of one step: peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
  step) minus the resident set before it, in a fresh subprocess per case (Linux);
- the tiny CPU size: the engine's tiny model (the `cpu` size of benchmarks/train_throughput.py)
  forward+backward with the module off, ``all`` and ``sliding``;
- shared vs copy target encoder: parameters the module registers, state-dict bytes, and the measured RSS
  growth of creating the module next to a real-memory so400m tower.

Run: ``python benchmarks/autoregressive_overhead.py [--rounds 2] [--quick] [--windows sliding,all] [--no-write]``
(``--quick``: no memory or target-encoder probes, only ``sliding`` timed unless ``--windows`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import core_share, is_quiet, machine_line, write_section  # noqa: E402

from lmms_engine.models.autoregressive_reconstruction import create_autoregressive_reconstruction_module  # noqa: E402
from lmms_engine.utils.flops import count_flops  # noqa: E402

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, vision_use_head=False)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=64, patch_size=8)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
FRAMES, HIDDEN, TOKENS, FULL = 16, 896, 196, 729
LLAVA_POOLING = {"enable_multiscale_pooling": True, "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "bilinear"}


def so400m(device: str = "meta", trainable: bool = False):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.device(device):
        tower = SiglipVisionModel(SiglipVisionConfig(**SO400M))
    return tower.requires_grad_(trainable)


WINDOWS = ("sliding", "sliding_dense", "all", "random")  # sliding_dense: the one pass on the dense-mask kernel


def realistic(window: str):
    """Module (shared, meta tower: no vision weights in memory) and its inputs."""
    config_window = "sliding" if window.startswith("sliding") else window
    torch.manual_seed(0)
    module = create_autoregressive_reconstruction_module(so400m(), HIDDEN, {**LLAVA_POOLING, "window": config_window})
    if window == "sliding_dense":
        module.predictor.attention_backend = "dense"
    torch.manual_seed(0)
    hidden = torch.randn(1, FRAMES * TOKENS, HIDDEN, requires_grad=True)
    features = torch.randn(1, FRAMES, FULL, 1152)
    return module, hidden, features


def step(module, hidden, features) -> None:
    module.compute_autoregressive_loss(hidden, target_features=features).backward()
    hidden.grad = None
    module.zero_grad(set_to_none=True)


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak_rss() -> float:
    """Reset the peak resident set (Linux clear_refs) and return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


# -- subprocess probes (each in a fresh process so the peak belongs to the measured work) ------------


def probe(kind: str) -> dict:
    if kind.startswith("step-"):
        module, hidden, features = realistic(kind.removeprefix("step-"))
        before = reset_peak_rss()
        step(module, hidden, features)
        return {"growth_mb": peak_rss_mb() - before}
    mode = kind.removeprefix("create-")
    tower = so400m("meta", trainable=(mode == "copy"))
    tower.to_empty(device="cpu")
    with torch.no_grad():
        for p in tower.parameters():
            p.fill_(0.01)  # touch every page so the tower is resident before measuring
    before = reset_peak_rss()
    module = create_autoregressive_reconstruction_module(tower, HIDDEN, {**LLAVA_POOLING, "target_encoder": mode})
    return {"growth_mb": rss_mb() - before, "peak_growth_mb": peak_rss_mb() - before,
            "mode": module.target_encoder_mode}


def run_probe(kind: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", kind], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- in-process measurements -------------------------------------------------------------------------


def gemm_peer(tokens: int, repeats: int) -> float:
    a, b = torch.randn(tokens, 1152), torch.randn(1152, 1152)
    seconds = statistics.median(timed(lambda: a @ b, repeats=max(5, repeats), warmup=2))
    return 2 * tokens * 1152 * 1152 / seconds / 1e9


def llm_flops(seq_len: int) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B))
        ids = torch.zeros(1, seq_len, dtype=torch.long)
    return count_flops(lambda: model(input_ids=ids, labels=ids).loss.backward())


def vision_flops() -> int:
    tower = so400m()
    pixels = torch.empty(FRAMES, 3, 384, 384, device="meta")
    with torch.no_grad():
        return count_flops(lambda: tower(pixel_values=pixels, output_hidden_states=True))


HEAD_TOKENS = 800  # the LM head is timed on this many tokens and scaled to the sequence (a GEMM: linear)


def formula_flops(window: str) -> tuple[float, int]:
    """(FLOPs as torch's counter counts them, supervised target tokens) of the module's step from the
    accounting formula (``ModelFlops``; tests/test_autoregressive_sliding.py checks it against the count)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from lmms_engine.train.throughput import ModelFlops

    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**SO400M).to_dict(),
                                  text_config=Qwen2Config(**QWEN2_05B).to_dict())
    config_window = "sliding" if window.startswith("sliding") else window
    estimate = ModelFlops.from_config(config, autoregressive={"embedding_dim": 1152, "window": config_window},
                                      ar_tokens_per_frame=TOKENS)
    if window == "sliding_dense":
        from dataclasses import replace

        estimate = replace(estimate, ar_window="all", ar_num_hist=FRAMES - 1)  # one window: the dense square
    matmuls, attention = estimate.predictor_parts(FRAMES)
    module = create_autoregressive_reconstruction_module(so400m(), HIDDEN, {**LLAVA_POOLING, "window": config_window})
    targets = sum(module.supervised_target_counts([FRAMES], TOKENS).values())
    return matmuls + attention * 3.5 / 3, targets  # torch counts attention's backward as 2.5x the forward


def step_parts(seq_len: int) -> dict:
    """Callables timing one forward+backward of each part of the real-width step, layers cut:
    ``llm_layer`` (one Qwen2-0.5B decoder layer on ``seq_len`` tokens, causal SDPA), ``vision_layer``
    (one SigLIP-so400m layer forward on the 16 frames, frozen: no backward), ``head`` (final norm, LM
    head and loss on ``HEAD_TOKENS`` tokens)."""
    from transformers import Qwen2Config, Qwen2Model, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    llm = Qwen2Model(Qwen2Config(**{**QWEN2_05B, "num_hidden_layers": 1, "vocab_size": 16},
                                 attn_implementation="sdpa"))
    embeds = torch.randn(1, seq_len, HIDDEN, requires_grad=True)
    tower = SiglipVisionModel(SiglipVisionConfig(**{**SO400M, "num_hidden_layers": 1},
                                                 attn_implementation="sdpa")).requires_grad_(False)
    pixels = torch.randn(FRAMES, 3, 384, 384)
    head = torch.nn.Linear(HIDDEN, QWEN2_05B["vocab_size"], bias=False)
    norm = torch.nn.RMSNorm(HIDDEN)
    head_in = torch.randn(1, HEAD_TOKENS, HIDDEN, requires_grad=True)
    labels = torch.randint(0, QWEN2_05B["vocab_size"], (HEAD_TOKENS,))

    def llm_layer():
        llm(inputs_embeds=embeds).last_hidden_state.sum().backward()
        llm.zero_grad(set_to_none=True)
        embeds.grad = None

    def vision_layer():
        with torch.no_grad():
            tower(pixel_values=pixels)

    def head_step():
        torch.nn.functional.cross_entropy(head(norm(head_in))[0], labels).backward()
        head.zero_grad(set_to_none=True)
        head_in.grad = None

    return {"llm_layer": llm_layer, "vision_layer": vision_layer, "head": head_step}


def tiny_steps() -> dict:
    """The engine's tiny model (train_throughput's ``cpu`` size) forward+backward: AR off / all / sliding."""
    from train_throughput import SIZES, model_config, samples

    from lmms_engine.models.builder import build_model

    batch_samples = samples("cpu", True)[: SIZES["cpu"]["batch"]]
    batch = {k: torch.stack([s[k] for s in batch_samples]) for k in batch_samples[0]}
    steps = {}
    for case in ("off", "all", "sliding"):
        cfg = model_config("cpu", case != "off")
        if case != "off":
            cfg["autoregressive_config"] = {**cfg["autoregressive_config"], "window": case}
        torch.manual_seed(0)
        model = build_model(cfg).train()

        def run(model=model):
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)

        steps[case] = run
    return steps


def state_bytes(module) -> tuple[int, int, int]:
    """(registered parameters, trainable parameters, state-dict bytes at each tensor's dtype)."""
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return params, trainable, size


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="no memory or target-encoder probes")
    parser.add_argument("--no-write", action="store_true", help="print only, do not rewrite RESULTS.md")
    parser.add_argument("--windows", help=f"comma-separated windows to time (of {', '.join(WINDOWS)}; default: "
                                          "all of them, `sliding` with --quick); the others' FLOPs come from "
                                          "the accounting formula")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return
    rounds = args.rounds
    load_start, started = os.getloadavg()[0], time.perf_counter()
    seq_len = FRAMES * TOKENS + 1 + 64  # video tokens, the newline, 64 text tokens

    timed_windows = tuple(args.windows.split(",")) if args.windows else (("sliding",) if args.quick else WINDOWS)
    unknown = [w for w in timed_windows if w not in WINDOWS]
    if unknown:
        parser.error(f"--windows: unknown {', '.join(unknown)} (choose from {', '.join(WINDOWS)})")
    cases = {w: realistic(w) for w in timed_windows}
    flops, targets = {}, {}
    for window, (module, hidden, features) in cases.items():  # the counted run doubles as the warm-up
        flops[window] = count_flops(lambda: step(module, hidden, features))
        targets[window] = module.compute_autoregressive_loss(hidden, target_features=features,
                                                             return_output=True).num_targets
    for window in WINDOWS:  # --quick: the others from the accounting formula (tested equal to the count)
        if window not in flops:
            flops[window], targets[window] = formula_flops(window)
    parts = step_parts(seq_len)
    for fn in parts.values():
        fn()
    tiny = tiny_steps()
    tiny_flops = {key: count_flops(fn) for key, fn in tiny.items()}  # the counted run doubles as a warm-up
    for fn in tiny.values():
        timed(fn, repeats=1, warmup=3)

    times: dict[str, list[float]] = {k: [] for k in [*timed_windows, *parts]}
    tiny_times: dict[str, list[float]] = {k: [] for k in tiny}
    tiny_ratio: dict[str, list[float]] = {"all": [], "sliding": []}
    for r in range(rounds):
        order = list(cases) + list(parts)
        for key in order[r % len(order):] + order[:r % len(order)]:
            if key in cases:
                module, hidden, features = cases[key]
                times[key] += timed(lambda: step(module, hidden, features), repeats=1, warmup=0)
            else:
                times[key] += timed(parts[key], repeats=1, warmup=0)
            print(key, f"{times[key][-1]:.2f} s", flush=True)
        # Tiny steps: many short ones, cases alternating, one thread (thread hand-offs dominate there).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for _ in range(10):
            for key, fn in tiny.items():
                tiny_times[key] += timed(fn, repeats=3, warmup=0)
        torch.set_num_threads(threads)
        for window in tiny_ratio:
            tiny_ratio[window].append(statistics.median(tiny_times[window][-30:]) / statistics.median(tiny_times["off"][-30:]))

    memory = {} if args.quick else {w: run_probe(f"step-{w}")["growth_mb"] for w in ("sliding", "all", "random")}
    predictor_tokens = (FRAMES - 1) * TOKENS
    gemm = gemm_peer(predictor_tokens, 3)
    llm = llm_flops(seq_len)
    vision = vision_flops()

    def full_step(r: int) -> float:  # round r's estimate of the real-width step without the module
        return (QWEN2_05B["num_hidden_layers"] * times["llm_layer"][r] + SO400M["num_hidden_layers"]
                * times["vision_layer"][r] + times["head"][r] * seq_len / HEAD_TOKENS)

    step_s = [full_step(r) for r in range(rounds)]
    step_ratio = {w: [1 + times[w][r] / step_s[r] for r in range(rounds)] for w in timed_windows}
    per_layer = {w: [times[w][r] / times["llm_layer"][r] for r in range(rounds)] for w in timed_windows}

    encoders = {}
    if not args.quick:
        for mode in ("shared", "copy"):
            tower = so400m(trainable=(mode == "copy"))
            module = create_autoregressive_reconstruction_module(tower, HIDDEN,
                                                                 {**LLAVA_POOLING, "target_encoder": mode})
            encoders[mode] = (*state_bytes(module), run_probe(f"create-{mode}"))
    tower_params = sum(p.numel() for p in so400m().parameters())
    load_end, share_end, minutes = os.getloadavg()[0], core_share(), (time.perf_counter() - started) / 60

    lines = [
        "## Autoregressive reconstruction overhead (`benchmarks/autoregressive_overhead.py`)",
        "",
        machine_line(("torch", "transformers")) + f"; torch threads {torch.get_num_threads()}. Command: "
        f"`python benchmarks/autoregressive_overhead.py --rounds {rounds}{' --quick' if args.quick else ''}"
        f"{' --windows ' + args.windows if args.windows else ''}` ({minutes:.0f} min). "
        + (f"Quiet machine: 1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end "
           f"(this run's own threads included), one busy thread got {share_end:.0%} of a core after it"
           if is_quiet(load_start, share_end) else
           f"**Shared, loaded machine**: 1-minute load average {load_start:.1f} at the start, {load_end:.1f} at "
           f"the end, one busy thread got {share_end:.0%} of a core after it (2 cores, several users)")
        + f"; times are medians (min-max) over {rounds} interleaved round(s), and the ratios are taken "
        "within a round.",
        "",
        f"Module at LLM hidden {HIDDEN}, {FRAMES} frames x {TOKENS} tokens (SigLIP-so400m 27x27 grid, bilinear "
        "stride 2), embedding 1152, batch 1, default predictor (3 layers, 8 heads, num_hist 3), shared target "
        "encoder (features handed over). `sliding`: one banded frame-causal pass (chunked attention, the CPU "
        "default); `sliding_dense`: the same on one SDPA call with the dense banded mask (the kernel's peer); "
        "`all`: every window of 4 frames; `random`: one window. FLOPs: `FlopCounterMode` with the CPU "
        "flash-attention formula registered (attention counted as the kernel computes it: the chunked kernel "
        "its blocks, a dense mask the full square).",
        "",
        "| window | supervised target tokens | fwd+bwd (s) | GFLOP | achieved GFLOP/s | peak RSS growth (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for window in WINDOWS:
        mem = f"{memory[window]:.0f}" if window in memory else "-"
        if window in times:
            med = statistics.median(times[window])
            lines.append(f"| `{window}` | {targets[window]} | {_med(times[window])} | {flops[window] / 1e9:.0f} | "
                         f"{flops[window] / med / 1e9:.0f} | {mem} |")
        else:
            lines.append(f"| `{window}` | {targets[window]} | not timed | {flops[window] / 1e9:.0f} "
                         f"(formula) | - | {mem} |")
    sl, al = "sliding", "all"
    lines += [
        "",
        f"Peer in the same run: a {predictor_tokens} x 1152 x 1152 float32 GEMM (the one pass's token count) "
        f"reaches {gemm:.0f} GFLOP/s. The one pass costs {flops[sl] / flops[al]:.2f}x `all` in FLOPs"
        + (f" and {_ratio([times[sl][r] / times[al][r] for r in range(rounds)])} in time" if al in times else "")
        + f", supervising every frame once ({targets[sl]} target tokens) where `all` predicts most frames 3 "
        f"times ({targets[al]})"
        + (f"; chunked attention vs the dense mask: "
           f"{_ratio([times[sl][r] / times['sliding_dense'][r] for r in range(rounds)])} in time"
           if "sliding_dense" in times else "") + ".",
        "",
        "| compared with (FLOPs counted on the meta device, attention included) | GFLOP | AR `sliding` / it "
        "| AR `all` / it | AR `random` / it |",
        "|---|---|---|---|---|",
        f"| Qwen2-0.5B forward+backward, {seq_len} tokens | {llm / 1e9:.0f} | {flops[sl] / llm:.1%} | "
        f"{flops[al] / llm:.1%} | {flops['random'] / llm:.1%} |",
        f"| SigLIP-so400m forward, {FRAMES} frames at 384 px | {vision / 1e9:.0f} | {flops[sl] / vision:.1%} | "
        f"{flops[al] / vision:.1%} | {flops['random'] / vision:.1%} |",
        f"| the whole step: both (frozen tower, forward only) | {(llm + vision) / 1e9:.0f} | "
        f"{flops[sl] / (llm + vision):.1%} | {flops[al] / (llm + vision):.1%} | "
        f"{flops['random'] / (llm + vision):.1%} |",
        "",
        "Measured step time at real widths, layers cut for the CPU (same rounds): one Qwen2-0.5B decoder layer "
        f"forward+backward on {seq_len} tokens {_med(times['llm_layer'])} s, one SigLIP-so400m layer forward on "
        f"{FRAMES} frames {_med(times['vision_layer'])} s, LM head + loss forward+backward on {HEAD_TOKENS} "
        f"tokens {_med(times['head'])} s (scaled x{seq_len / HEAD_TOKENS:.1f} to the sequence). Estimated full "
        f"step (24 + 27 layers + head): {_med(step_s)} s.",
        "",
        "| window | module time / one LLM layer | step with the module / without (estimated full step) |",
        "|---|---|---|",
    ]
    for window in timed_windows:
        lines.append(f"| `{window}` | {_ratio(per_layer[window])} | {_ratio(step_ratio[window])} |")
    lines += [
        "",
        "Tiny CPU size (the engine's tiny model, the `cpu` size of `benchmarks/train_throughput.py`: 2 videos x "
        "8 frames at 64 px, predictor 1 layer, one thread), forward+backward through the model, steps "
        f"alternating: module off {statistics.median(tiny_times['off']) * 1e3:.1f} ms, `all` "
        f"{statistics.median(tiny_times['all']) * 1e3:.1f} ms, `sliding` "
        f"{statistics.median(tiny_times['sliding']) * 1e3:.1f} ms (medians of {len(tiny_times['off'])} steps); "
        f"AR step / SFT step: `all` {_ratio(tiny_ratio['all'])}, `sliding` {_ratio(tiny_ratio['sliding'])} "
        f"(per-round medians, {rounds} rounds). Counted FLOPs of the steps: module off "
        f"{tiny_flops['off'] / 1e6:.0f} M, `all` {tiny_flops['all'] / 1e6:.0f} M, `sliding` "
        f"{tiny_flops['sliding'] / 1e6:.0f} M: the module adds {tiny_flops['all'] / tiny_flops['off'] - 1:.1%} "
        f"(`all`) and {tiny_flops['sliding'] / tiny_flops['off'] - 1:.1%} (`sliding`) of the step's FLOPs, so at "
        "the model's own FLOP rate the ratio would be 1 plus that.",
        "",
        "Goals (one pass, every frame supervised): FLOPs <= 10 % of the Qwen2-0.5B step: "
        f"{flops[sl] / llm:.1%} (`all`: {flops[al] / llm:.1%}); step time at real widths <= 1.10x: "
        + ", ".join(f"`{w}` {_ratio(step_ratio[w])}" for w in timed_windows)
        + f"; tiny CPU step <= 1.15x: `sliding` {_ratio(tiny_ratio['sliding'])} (`all` {_ratio(tiny_ratio['all'])}).",
    ]
    if encoders:
        lines += [
            "",
            f"Target encoder, SigLIP-so400m tower ({tower_params / 1e6:.1f} M parameters; parameter counts and "
            "state-dict bytes from the module itself, RSS growth measured when creating the module next to a "
            "resident float32 tower):",
            "",
            "| target_encoder | registered params (M) | trainable params (M) | state-dict MB (fp32) | "
            "same in bf16 (MB) | measured RSS growth at creation (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for mode, (params, trainable, size, probe_result) in encoders.items():
            lines.append(f"| `{mode}` | {params / 1e6:.1f} | {trainable / 1e6:.1f} | {size / 2**20:.0f} | "
                         f"{size / 2 / 2**20:.0f} | {probe_result['growth_mb']:.0f} |")
        shared, copy_ = encoders["shared"], encoders["copy"]
        lines += [
            "",
            f"`copy` adds {(copy_[2] - shared[2]) / 2**20:.0f} MB of weights (= {tower_params / 1e6:.1f} M x 4 "
            f"bytes; half in bf16), saved in every checkpoint, and one vision forward per step "
            f"({vision / 1e9:.0f} GFLOP); `shared` adds neither. Neither mode adds trainable parameters beyond "
            "the predictor.",
        ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        print(f"wrote {write_section('autoregressive_overhead', markdown)}")


if __name__ == "__main__":
    main()
