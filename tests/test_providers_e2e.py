"""Gemini and the OpenAI Images API end to end: the real CLI against the real simulator.

Each provider clean and under a heavy fault mix (every image decoded by Pillow,
its size checked against what the job asked for); a mixed catalog over three
endpoints where one is rate limited and the others are not slowed; a per-day
quota that stops the run; a blocked prompt that fails alone; canary keys.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch.sim.images import image_dims
from tests.conftest import (
    KEY,
    Simulator,
    cli_env,
    read_results,
    run_cli,
    simulator,
    spawn_cli,
)

SCALE = "0.0625"
PIXEL = Path(__file__).parent / "data" / "manifests" / "pixel.png"
OPENAI_PIXELS = {"1:1": (1024, 1024), "3:2": (1536, 1024), "2:3": (1024, 1536)}
ENV = {"gemini": "GEMINI_API_KEY", "openai-images": "OPENAI_API_KEY", "chat": "QINIU_API_KEY"}


def base_url(sim: Simulator, provider: str) -> str:
    return sim.url.removesuffix("/v1") + "/v1beta" if provider == "gemini" else sim.url


def env(**keys: str) -> dict[str, str]:
    out = cli_env()
    for name in ENV.values():
        out.pop(name, None)
    out.update(keys)
    return out


def jobs_for(provider: str, sim: Simulator, n: int) -> list[dict[str, object]]:
    ratios = ["1:1", "3:2", "2:3"]
    jobs: list[dict[str, object]] = []
    for i in range(n):
        job: dict[str, object] = {"id": f"{provider}-{i:02d}", "prompt": f"{provider} picture {i}",
                                  "aspect_ratio": ratios[i % 3]}
        if provider == "gemini":
            job["image_size"] = ["1K", "2K"][i % 2]
        else:
            job["quality"] = ["low", "medium", "high"][i % 3]
        if i % 4 == 1:
            job["images"] = [str(PIXEL)]
        if i % 4 == 3:  # a URL input: fetched by imgbatch for Gemini, passed on for OpenAI
            job["images"] = [sim.url.removesuffix("/v1") + "/_inputs/40x30.png", str(PIXEL)]
        jobs.append(job)
    return jobs


def expected_size(provider: str, job: dict[str, object]) -> tuple[int, int]:
    scale = float(SCALE)
    if provider == "gemini":
        return image_dims(str(job["aspect_ratio"]), str(job["image_size"]), scale)
    width, height = OPENAI_PIXELS[str(job["aspect_ratio"])]
    return max(1, round(width * scale)), max(1, round(height * scale))


def no_key_anywhere(out: Path, *texts: str) -> None:
    for text in texts:
        assert KEY not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("provider", ["gemini", "openai-images"])
@pytest.mark.parametrize("faults", ["clean", "heavy"])
def test_provider_end_to_end(tmp_path: Path, provider: str, faults: str) -> None:
    flags = ["--scale", SCALE]
    if faults == "heavy":
        flags += ["--fault-mix", "0.7", "--retry-after", "0.05", "--seed", "7"]
    with simulator(*flags) as sim:
        jobs = jobs_for(provider, sim, 12)
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
        out = tmp_path / "out"
        done = run_cli("run", str(manifest), "--output", str(out), "--provider", provider,
                       "--base-url", base_url(sim, provider), "--max-attempts", "8",
                       "--no-gallery", env={**env(), ENV[provider]: KEY})
        stats = sim.stats()
    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in read_results(out)}
    for job in jobs:
        row = rows[str(job["id"])]
        assert row["status"] == "succeeded"
        (image,) = row["images"]  # a Gemini draft is not a result, nor does it take the name
        assert image["path"].startswith(f"images/{job['id']}.")
        with Image.open(out / image["path"]) as decoded:  # an oracle apart from imgbatch's own
            decoded.load()
            assert decoded.size == expected_size(provider, job)
    if faults == "heavy":
        assert sum(stats["faults"].values()) >= 4  # the mix really hit this run
    no_key_anywhere(out, done.stdout, done.stderr)


def test_a_per_day_quota_stops_the_run_with_jobs_pending(tmp_path: Path) -> None:
    with simulator("--scale", SCALE, "--daily-quota", "2") as sim:
        jobs = [{"id": f"q{i}", "prompt": f"quota {i}"} for i in range(5)]
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
        out = tmp_path / "out"
        done = run_cli("run", str(manifest), "--output", str(out), "--provider", "gemini",
                       "--base-url", base_url(sim, "gemini"), "--concurrency", "1",
                       "--no-gallery", env={**env(), "GEMINI_API_KEY": KEY})
        stats = sim.stats()
    assert done.returncode == 3, done.stderr
    assert "GenerateRequestsPerDayPerProjectPerModel" in done.stderr
    statuses = [row["status"] for row in read_results(out)]
    assert statuses.count("succeeded") == 2 and statuses.count("pending") == 3
    assert stats["requests"] == 3  # the quota is not retried for hours
    no_key_anywhere(out, done.stdout, done.stderr)


@pytest.mark.parametrize("provider", ["gemini", "openai-images"])
def test_a_blocked_prompt_fails_alone_with_its_reason(tmp_path: Path, provider: str) -> None:
    with simulator("--scale", SCALE, "--block-word", "forbidden") as sim:
        jobs = [{"id": f"b{i}", "prompt": "a forbidden castle" if i == 2 else f"castle {i}"}
                for i in range(4)]
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
        out = tmp_path / "out"
        done = run_cli("run", str(manifest), "--output", str(out), "--provider", provider,
                       "--base-url", base_url(sim, provider), "--no-gallery",
                       env={**env(), ENV[provider]: KEY})
        by_prompt = sim.stats()["by_prompt"]
    assert done.returncode == 1, done.stderr
    rows = {row["id"]: row for row in read_results(out)}
    assert rows["b2"]["status"] == "failed" and rows["b2"]["error"]["type"] == "blocked"
    assert ("PROHIBITED_CONTENT" if provider == "gemini" else "safety system") in \
        rows["b2"]["error"]["message"]
    assert all(rows[f"b{i}"]["status"] == "succeeded" for i in (0, 1, 3))
    assert sorted(by_prompt.values()) == [1, 1, 1, 1]  # blocked is not retried


MIXED = """\
endpoints:
  qiniu:  {{provider: chat, base_url: "{chat}", api_key_env: QINIU_API_KEY}}
  google: {{provider: gemini, base_url: "{gemini}", api_key_env: GEMINI_API_KEY,
            concurrency: 2}}
  openai: {{provider: openai-images, base_url: "{openai}", api_key_env: OPENAI_API_KEY}}
jobs:
{jobs}
"""


def mixed_catalog(path: Path, chat: Simulator, gemini: Simulator, openai: Simulator,
                  per_endpoint: int) -> Path:
    lines = []
    for i in range(per_endpoint):
        lines.append(f'  - {{id: g{i}, prompt: "lighthouse {i}", endpoint: google, '
                     f'model: gemini-3-pro-image-preview, image_size: 2K}}')
        lines.append(f'  - {{id: o{i}, prompt: "lighthouse icon {i}", endpoint: openai, '
                     f'model: gpt-image-1-mini, quality: low}}')
        lines.append(f'  - {{id: q{i}, prompt: "lighthouse sketch {i}"}}')
    path.write_text(MIXED.format(chat=chat.url, gemini=base_url(gemini, "gemini"),
                                 openai=openai.url, jobs="\n".join(lines)))
    return path


def test_one_rate_limited_endpoint_does_not_slow_the_others(tmp_path: Path) -> None:
    n = 6
    keys = {"QINIU_API_KEY": KEY, "GEMINI_API_KEY": KEY, "OPENAI_API_KEY": KEY}
    with simulator("--scale", SCALE, "--latency", "0.1") as chat, \
            simulator("--scale", SCALE, "--rpm-limit", "1", "--rate-window", "1.5") as gemini, \
            simulator("--scale", SCALE, "--latency", "0.1") as openai:
        manifest = mixed_catalog(tmp_path / "mixed.yaml", chat, gemini, openai, n)
        out = tmp_path / "out"
        process = spawn_cli("run", str(manifest), "--output", str(out), "--no-gallery",
                            "--concurrency", "4", env={**env(), **keys})
        try:
            # The two endpoints that are not limited finish while Google still waits:
            # its n jobs need n windows of 1.5 s.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                quick = [s.stats()["by_status"].get("200", 0) for s in (chat, openai)]
                if quick == [n, n]:
                    break
                time.sleep(0.05)
            google_done = gemini.stats()["by_status"].get("200", 0)
            _, stderr = process.communicate(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
        quiet = [s.stats() for s in (chat, openai)]
        limited = gemini.stats()
    assert process.returncode == 0, stderr
    assert quick == [n, n] and google_done < n
    for stats in quiet:  # no request of theirs waited on Google's 429s, or met one
        assert stats["by_status"].get("429", 0) == 0 and stats["requests"] == n
    assert limited["by_status"].get("429", 0) > 0
    rows = read_results(out)
    assert len(rows) == 3 * n and all(row["status"] == "succeeded" for row in rows)
    assert KEY not in stderr


def test_a_missing_key_for_an_endpoint_with_jobs_sends_nothing(tmp_path: Path) -> None:
    with simulator("--scale", SCALE) as sim:
        manifest = mixed_catalog(tmp_path / "mixed.yaml", sim, sim, sim, 1)
        out = tmp_path / "out"
        done = run_cli("run", str(manifest), "--output", str(out), "--no-gallery",
                       env={**env(), "QINIU_API_KEY": KEY, "GEMINI_API_KEY": KEY})
        requests = sim.stats()["requests"]
    assert done.returncode == 2
    assert "OPENAI_API_KEY (endpoint openai)" in done.stderr
    assert requests == 0


def test_validate_prints_plan_and_cost_per_endpoint(tmp_path: Path) -> None:
    with simulator("--scale", SCALE) as sim:
        manifest = mixed_catalog(tmp_path / "mixed.yaml", sim, sim, sim, 2)
    done = run_cli("validate", str(manifest), env=env())
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0].strip(): line for line in done.stdout.splitlines()}
    assert "2 job(s)" in lines["endpoint google"] and "$0.27" in lines["endpoint google"]
    assert "gpt-image-1-mini x2" in lines["endpoint openai"] and "$0.01" in lines["endpoint openai"]
    assert "chat" in lines["endpoint qiniu"]


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"User-Agent": "imgbatch-test", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_simulator_refuses_what_the_real_apis_refuse() -> None:
    good = {"contents": [{"parts": [{"text": "a cat"}]}],
            "generationConfig": {"responseModalities": ["IMAGE"],
                                 "imageConfig": {"aspectRatio": "1:1"}}}
    with simulator("--scale", SCALE) as sim:
        gemini = base_url(sim, "gemini") + "/models/gemini-3-pro-image-preview:generateContent"
        as_json = {"Content-Type": "application/json"}
        cases = [
            (gemini, good, {"Authorization": f"Bearer {KEY}"}, 403, "unregistered callers"),
            (gemini, {**good, "Contents": good["contents"]}, {"x-goog-api-key": KEY}, 400,
             'Unknown name "Contents"'),
            (gemini, {**good, "generationConfig": {"imageConfig": {"aspectRatio": "7:5"}}},
             {"x-goog-api-key": KEY}, 400, "Unsupported aspect ratio"),
            (sim.url + "/images/generations", {"model": "gpt-image-1", "prompt": "p",
                                                "size": "1792x1024"},
             {"Authorization": f"Bearer {KEY}"}, 400, "Supported values"),
            (sim.url + "/images/generations", {"model": "gpt-image-1", "prompt": "p",
                                                "style": "vivid"},
             {"Authorization": f"Bearer {KEY}"}, 400, "Unknown parameter"),
        ]
        for url, body, headers, status, said in cases:
            got, document = post(url, json.dumps(body).encode(), {**as_json, **headers})
            assert (got, said in document["error"]["message"]) == (status, True), document
        ok, document = post(gemini, json.dumps(good).encode(), {**as_json, "x-goog-api-key": KEY})
    assert ok == 200 and document["candidates"][0]["finishReason"] == "STOP"


def test_the_readme_mixed_catalog_runs_to_the_end_against_the_simulator(tmp_path: Path) -> None:
    """jobs/mixed.yaml, as the README runs it: three providers, faults injected, to 100%."""
    keys = {"QINIU_API_KEY": KEY, "GEMINI_API_KEY": KEY, "OPENAI_API_KEY": KEY}
    with simulator("--scale", SCALE, "--fault-mix", "0.5", "--retry-after", "0.05",
                   "--seed", "3") as sim:
        site = sim.url.removesuffix("/v1")
        out = tmp_path / "out"
        done = run_cli("run", "jobs/mixed.yaml", "--output", str(out), "--no-gallery",
                       "--base-url", f"qiniu={site}/v1", "--base-url", f"google={site}/v1beta",
                       "--base-url", f"openai={site}/v1", env={**env(), **keys})
        again = run_cli("run", "jobs/mixed.yaml", "--output", str(out), "--no-gallery",
                        "--base-url", f"qiniu={site}/v1", "--base-url", f"google={site}/v1beta",
                        "--base-url", f"openai={site}/v1", env={**env(), **keys})
        stats = sim.stats()
    assert done.returncode == 0, done.stderr
    assert again.returncode == 0 and "0 request(s) this run" in again.stderr
    rows = read_results(out)
    assert len(rows) == 6 and all(row["status"] == "succeeded" for row in rows)
    assert stats["by_prompt"] and sum(stats["faults"].values()) > 0
    no_key_anywhere(out, done.stdout, done.stderr, again.stderr)


@pytest.mark.parametrize("provider", ["gemini", "openai-images"])
def test_a_refused_key_stops_the_run_and_shows_nowhere(tmp_path: Path, provider: str) -> None:
    with simulator("--scale", SCALE, "--api-key", "another-key") as sim:
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json.dumps({"id": f"k{i}", "prompt": f"key {i}"}) + "\n"
                                    for i in range(3)))
        out = tmp_path / "out"
        done = run_cli("run", str(manifest), "--output", str(out), "--provider", provider,
                       "--base-url", base_url(sim, provider), "--concurrency", "1",
                       env={**env(), ENV[provider]: KEY})
    assert done.returncode == 3, done.stderr
    assert ("API key not valid" if provider == "gemini" else "Incorrect API key") in done.stderr
    assert {row["status"] for row in read_results(out)} == {"pending"}
    no_key_anywhere(out, done.stdout, done.stderr)
