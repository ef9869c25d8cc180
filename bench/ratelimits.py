"""The benchmark's 429 workloads (issue 11): noise that must not throttle, a limit that must.

7. mixed faults: 300 jobs, 32 in flight; 30% of first and second attempts fail,
   429 (Retry-After 1 s) three times as often as each of 500, 502, 503, reset,
   truncated body, bad base64 and a body that is not JSON;
8. sporadic 429s: 10% of every request answered 429 (Retry-After 1 s) at 0.5 s
   latency, against the same run with no 429s;
9. a 20-requests-per-2-s sliding window at 64 in flight, no ``--rpm``.

Each runs imgbatch and the naive peer against a fresh simulator, as the other
workloads of bench/run.py do; the functions take its context and helpers.
"""

from __future__ import annotations

from typing import Any

import run as bench

SMALL = bench.SMALL
MIXED_JOBS, MIXED_CONC = 300, 32
# 30% in ten shares: 429 three, 500 + 503 two (the JSON 5xx fault picks one of the two),
# 502, reset, truncated, bad base64, not JSON one each.
MIXED_FAULTS = {"rate-limit": 0.09, "server-error-json": 0.06, "server-error-html": 0.03,
                "reset": 0.03, "truncate": 0.03, "bad-base64": 0.03, "bad-json": 0.03}
MIXED_MAX_RATIO = 3.0
SPORADIC_JOBS, SPORADIC_CONC, SPORADIC_P, SPORADIC_LATENCY = 300, 32, 0.1, 0.5
SPORADIC_MAX_RATIO = 1.3
WINDOW_JOBS, WINDOW_CONC, WINDOW_LIMIT, WINDOW_S = 200, 64, 20, 2.0
WINDOW_MAX_429, WINDOW_MAX_OVER = 0.05, 1.3


def _share(run: Any) -> float:
    return run.r429 / run.requests if run.requests else 1.0


def w_mixed(ctx: Any) -> None:
    jobs = ctx.n(MIXED_JOBS)
    manifest = ctx.out / "manifests" / "mixed.jsonl"
    ids = bench.write_manifest(manifest, "mixed", jobs)
    faults = [arg for name, p in MIXED_FAULTS.items() for arg in (f"--fault-{name}", f"{p:g}")]
    sim_args = (*SMALL, *faults, "--fault-attempts", "2", "--retry-after", "1", "--seed", "42")
    ib, peer = (bench.run_client(ctx, "mixed", label, manifest, ids, sim_args, MIXED_CONC)
                for label in ("imgbatch", "peer"))
    ok = ib.valid == jobs and not ib.m.timed_out
    wall_ok = ok and ib.m.wall_s < MIXED_MAX_RATIO * peer.m.wall_s
    w = (f"7. mixed faults ({jobs} jobs, {MIXED_CONC} in flight, 30% of first and second "
         "attempts: 429 ×3, 500, 502, 503, reset, truncated, bad base64, not JSON)")
    ctx.rows += [
        bench.Row(w, "images valid", bench.pct(ib.valid, jobs), bench.pct(peer.valid, jobs),
                  "—", "all", bench.met(ok)),
        bench.Row(w, "requests (answered 429)", f"{ib.requests} ({ib.r429})",
                  f"{peer.requests} ({peer.r429})", "—", "", ""),
        bench.Row(w, "wall time", f"{ib.m.wall_s:.2f} s", f"{peer.m.wall_s:.2f} s",
                  bench.ratio(ib.m.wall_s, peer.m.wall_s),
                  f"imgbatch < {MIXED_MAX_RATIO:g}x peer", bench.met(wall_ok)),
    ]
    bench.emit(ctx, "7 mixed", [ib, peer], [
        f"imgbatch {ib.valid}/{jobs} in {ib.m.wall_s / peer.m.wall_s:.2f}x the peer's wall "
        f"(target < {MIXED_MAX_RATIO:g}x): {bench.met(wall_ok)}"])


def w_sporadic(ctx: Any) -> None:
    jobs = ctx.n(SPORADIC_JOBS)
    manifest = ctx.out / "manifests" / "sporadic.jsonl"
    ids = bench.write_manifest(manifest, "sporadic", jobs)
    clean_args = (*SMALL, "--latency", f"{SPORADIC_LATENCY:g}")
    noisy_args = (*clean_args, "--fault-rate-limit", f"{SPORADIC_P:g}", "--fault-attempts", "0",
                  "--retry-after", "1", "--seed", "7")
    runs = {
        (label, noisy): bench.run_client(ctx, f"sporadic-{'429' if noisy else 'clean'}", label,
                                         manifest, ids, noisy_args if noisy else clean_args,
                                         SPORADIC_CONC)
        for noisy in (False, True) for label in ("imgbatch", "peer")
    }
    ib_clean, ib_noisy = runs["imgbatch", False], runs["imgbatch", True]
    peer_clean, peer_noisy = runs["peer", False], runs["peer", True]
    cost = ib_noisy.m.wall_s / ib_clean.m.wall_s
    ok = ib_noisy.valid == jobs and ib_clean.valid == jobs and not ib_noisy.m.timed_out
    cost_ok = ok and cost < SPORADIC_MAX_RATIO
    w = (f"8. sporadic 429s ({jobs} jobs, {SPORADIC_CONC} in flight, {SPORADIC_LATENCY:g} s "
         f"latency, {SPORADIC_P:.0%} of every request 429 with Retry-After 1 s)")
    ctx.rows += [
        bench.Row(w, "images valid, no 429s · with 429s",
                  f"{ib_clean.valid}/{jobs} · {ib_noisy.valid}/{jobs}",
                  f"{peer_clean.valid}/{jobs} · {peer_noisy.valid}/{jobs}", "—", "all",
                  bench.met(ok)),
        bench.Row(w, "requests answered 429", bench.pct(ib_noisy.r429, ib_noisy.requests),
                  bench.pct(peer_noisy.r429, peer_noisy.requests), "—", "", ""),
        bench.Row(w, "wall, no 429s · with 429s",
                  f"{ib_clean.m.wall_s:.2f} s · {ib_noisy.m.wall_s:.2f} s",
                  f"{peer_clean.m.wall_s:.2f} s · {peer_noisy.m.wall_s:.2f} s", "—", "", ""),
        bench.Row(w, "what the 429s cost (wall with / without)", f"{cost:.2f}x",
                  f"{peer_noisy.m.wall_s / peer_clean.m.wall_s:.2f}x", "—",
                  f"imgbatch < {SPORADIC_MAX_RATIO:g}x", bench.met(cost_ok)),
    ]
    bench.emit(ctx, "8 sporadic", [ib_clean, ib_noisy, peer_clean, peer_noisy], [
        f"imgbatch: 10% 429s cost {cost:.2f}x (target < {SPORADIC_MAX_RATIO:g}x): "
        f"{bench.met(cost_ok)}"])


def w_window(ctx: Any) -> None:
    jobs = ctx.n(WINDOW_JOBS)
    # A window lets a bursty client send WINDOW_LIMIT at once, then one window per batch.
    ideal = max(1, -(-jobs // WINDOW_LIMIT) - 1) * WINDOW_S
    manifest = ctx.out / "manifests" / "window.jsonl"
    ids = bench.write_manifest(manifest, "window", jobs)
    sim_args = (*SMALL, "--rpm-limit", str(WINDOW_LIMIT), "--rate-window", f"{WINDOW_S:g}")
    ib, peer = (bench.run_client(ctx, "window", label, manifest, ids, sim_args, WINDOW_CONC)
                for label in ("imgbatch", "peer"))
    # The same gateway naming its spent window in x-ratelimit-* headers (shown, no target).
    said = bench.run_client(ctx, "window", "imgbatch+headers", manifest, ids,
                            (*sim_args, "--quota-headers"), WINDOW_CONC)
    done_ok = ib.valid == jobs and not ib.m.timed_out
    share_ok = done_ok and _share(ib) < WINDOW_MAX_429
    wall_ok = done_ok and ib.m.wall_s < WINDOW_MAX_OVER * ideal
    w = (f"9. burst limit ({jobs} jobs, {WINDOW_LIMIT} per {WINDOW_S:g} s sliding window, "
         f"{WINDOW_CONC} in flight, no --rpm)")
    ctx.rows += [
        bench.Row(w, "jobs done", f"{ib.valid}/{jobs}", f"{peer.valid}/{jobs}", "—",
                  f"{jobs}/{jobs}", bench.met(done_ok)),
        bench.Row(w, "requests answered 429 (first wave included)",
                  bench.pct(ib.r429, ib.requests), bench.pct(peer.r429, peer.requests), "—",
                  f"< {WINDOW_MAX_429:.0%}", bench.met(share_ok)),
        bench.Row(w, "the same, the gateway sending x-ratelimit-* headers: 429s, wall",
                  f"{bench.pct(said.r429, said.requests)}, {said.m.wall_s:.1f} s "
                  f"({said.valid}/{jobs} done)", "—", "—", "", ""),
        bench.Row(w, f"wall vs ideal {ideal:g} s", f"{ib.m.wall_s:.1f} s "
                  f"({ib.m.wall_s / ideal:.2f}x)", f"{peer.m.wall_s:.1f} s "
                  f"({peer.m.wall_s / ideal:.2f}x)", bench.ratio(ib.m.wall_s, peer.m.wall_s),
                  f"< {WINDOW_MAX_OVER:g}x ideal", bench.met(wall_ok)),
    ]
    bench.emit(ctx, "9 window", [ib, said, peer], [
        f"imgbatch {ib.valid}/{jobs}, 429 share {_share(ib):.1%} {bench.met(share_ok)}, "
        f"{ib.m.wall_s / ideal:.2f}x ideal {bench.met(wall_ok)}"])


NOTES = [
    "- Workloads 7-9 (issue 11): 429s that are noise must not throttle the pool, and a burst "
    "limit must cost few 429s. 7: `--fault-rate-limit 0.09 --fault-server-error-json 0.06 "
    "--fault-server-error-html 0.03 --fault-reset 0.03 --fault-truncate 0.03 "
    "--fault-bad-base64 0.03 --fault-bad-json 0.03 --fault-attempts 2 --retry-after 1` (the "
    "JSON 5xx fault is a 500 or a 503, the HTML one a 502). 8: `--latency 0.5 "
    "--fault-rate-limit 0.1 --fault-attempts 0 --retry-after 1` against `--latency 0.5`; a "
    "429'd request waits its own Retry-After, so the run ends about one Retry-After after the "
    "clean one. 9: `--rpm-limit 20 --rate-window 2`; the ideal is 9 windows of 2 s after the "
    "first burst of 20.",
]
