"""Cost of the predictions page (`llava_loop.report`) for a large eval set, on the CPU.

Writes ``--images`` distinct photo-like JPEG files (640x480, cut from matplotlib's sample photo with a
different crop and tint each), builds an eval set of ``--samples`` questions about them (a VQA set asks
several questions per image), and measures what `fit` adds to an evaluation: making every thumbnail (the
first evaluation only: the image is decoded and shrunk), building the page with the thumbnails cached (every
evaluation), writing it; and the page's size. ``--browser`` also times headless Chromium loading it until
every image has decoded.

Usage (from the repository root):
    PYTHONPATH=. python benchmarks/predictions_page.py --samples 5000 --images 1000 [--browser]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from matplotlib import cbook
from PIL import Image, ImageEnhance

from llava_loop.data import as_dataset
from llava_loop.report import Thumbnails, predictions_page, write_predictions_page


def photos(folder: Path, n: int) -> list[str]:
    """``n`` distinct 640x480 JPEG files in ``folder``; their names."""
    source = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    rng = random.Random(0)
    names = []
    for i in range(n):
        x, y = rng.randint(0, 120), rng.randint(0, 150)
        image = source.crop((x, y, x + 390, y + 450)).resize((640, 480))
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.3, 1.7))
        name = f"{i:05d}.jpg"
        image.save(folder / name, quality=90)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--browser", action="store_true", help="also time headless Chromium loading the page")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    names = photos(folder, args.images)
    records = [
        {"id": f"q{i}", "image": names[i % len(names)], "conversations": [
            {"from": "human", "value": f"<image>\nQuestion {i} about the photo?"}, {"from": "gpt", "value": "yes"}]}
        for i in range(args.samples)
    ]  # fmt: skip
    dataset = as_dataset(records, image_folder=folder)
    samples = [
        {"index": i, "id": r["id"], "prompt": f"USER: <image>\n{r['conversations'][0]['value']} ASSISTANT:",
         "prediction": "no" if i % 3 else "yes", "references": ["yes"], "scores": {"exact_match": float(i % 3 == 0)}}
        for i, r in enumerate(records)
    ]  # fmt: skip
    metrics = {"eval/exact_match": 1 / 3, "eval/samples": float(args.samples)}
    thumbnails = Thumbnails(dataset)

    t0 = time.perf_counter()
    predictions_page(samples, metrics, step=1, thumbnails=thumbnails)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    page = predictions_page(samples, metrics, step=2, thumbnails=thumbnails)
    later = time.perf_counter() - t0
    path = folder / "step_000002.html"
    t0 = time.perf_counter()
    write_predictions_page(path, samples, metrics, step=2, thumbnails=thumbnails)
    written = time.perf_counter() - t0 - later
    print(f"{args.samples:,} samples, {args.images:,} distinct 640x480 JPEG photos")
    print(f"first page (loads and shrinks every image): {first:.2f} s ({1000 * first / args.samples:.2f} ms/sample)")
    print(f"later pages (thumbnails cached): build {later:.3f} s, write {written:.3f} s")
    print(f"page size: {len(page.encode()) / 2**20:.1f} MiB ({len(page.encode()) / args.images / 1024:.1f} KiB/image)")
    if args.browser:
        load_in_browser(path, folder)


def load_in_browser(path: Path, folder: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={folder}/p",
    ):
        options.add_argument(flag)  # fmt: skip
    driver = webdriver.Chrome(options=options, service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")))
    try:
        t0 = time.perf_counter()
        driver.get(path.as_uri())
        WebDriverWait(driver, 120).until(
            lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth)")
        )
        print(f"headless Chromium: loaded, every image decoded in {time.perf_counter() - t0:.2f} s")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
