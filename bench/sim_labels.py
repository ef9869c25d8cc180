"""What drawing the job's id and prompt costs the simulator, per image made (no cache hits).

    .venv/bin/python bench/sim_labels.py

64x64 is what `make bench` asks for (``--scale 0.0625``: no band is drawn below
256 px, so only the label text is computed); 1K and 4K are the demo's sizes.
"""

from __future__ import annotations

import json
import time

from batch.sim.images import PngMaker, image_dims, label_lines


def per_image_ms(width: int, height: int, labelled: bool, count: int) -> float:
    maker = PngMaker(0)
    started = time.perf_counter()
    for i in range(count):
        rgb = bytes((i % 256, 7, 9))  # a new colour each time, as for distinct prompts
        label = tuple(label_lines(f"job-{i}", f"picture number {i} of a job")) if labelled else ()
        maker.png(width, height, rgb, b"k\0v", label)
    return (time.perf_counter() - started) / count * 1000


def main() -> None:
    for name, (width, height), count in (("64x64", (64, 64), 400),
                                         ("1K 1:1", image_dims("1:1", "1K"), 20),
                                         ("4K 16:9", image_dims("16:9", "4K"), 4)):
        plain = per_image_ms(width, height, False, count)
        labelled = per_image_ms(width, height, True, count)
        print(json.dumps({"size": name, "plain_ms": round(plain, 3),
                          "labelled_ms": round(labelled, 3)}))


if __name__ == "__main__":
    main()
