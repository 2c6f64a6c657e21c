"""The recognition stage on real tiny TrOCR models: crop preparation and out-of-memory back-off."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from operators.recognize import prepare_crops
from pipeline.model import load_line_preprocessor
from pipeline.records import LineRecord, PageWork


def _line(x0, y0, x1, y1, order) -> LineRecord:
    return LineRecord(bbox=(x0, y0, x1, y1), polygon=[(x0, y0), (x1, y0), (x1, y1), (x0, y1)], block=0, order=order)


def test_prepare_crops_fits_every_shape_and_drops_empty_boxes(tiny_model):
    preprocessor = load_line_preprocessor(str(tiny_model))
    page = np.full((1200, 1600), 255, dtype=np.uint8)
    page[100:130, 100:900] = 0
    lines = [_line(100, 100, 900, 130, 0),      # ordinary line
             _line(50, 300, 50, 340, 1),        # zero width
             _line(0, 500, 1600, 506, 2),       # 1600 x 6: extreme wide
             _line(700, 0, 708, 1200, 3)]       # 8 x 1200: extreme tall
    work = prepare_crops(PageWork("d", "s", 1, 300, 1600, 1200, image=page, lines=lines), preprocessor, padding=4)
    assert [line.order for line in work.lines] == [0, 2, 3]
    assert len(work.line_pixels) == 3
    height, width = preprocessor.input_size
    assert all(pixels.shape == (height, width) and pixels.dtype == np.uint8 for pixels in work.line_pixels)
    assert work.image is None


OOM_PROBE = textwrap.dedent("""
    import os, resource, sys
    import numpy as np, torch
    from operators.recognize import TrOCRRecognizer
    from pipeline.config import RecognizeConfig

    torch.set_num_threads(1)
    recognizer = TrOCRRecognizer(RecognizeConfig(model=sys.argv[1], line_batch_size=2048, max_new_tokens=4,
                                                 device="cpu"))
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (32, 128, 3), dtype=np.uint8) for _ in range(2048)]
    hints = [1.0] * len(crops)
    reference = [r.text for r in recognizer._decode(crops[:16], hints[:16])]
    # a real allocation limit: 150 MB above what the process maps now, far below what 2048 lines need
    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 150 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    readings = recognizer.decode_with_backoff(crops, hints)
    print("batch", recognizer.line_batch_size)
    print("unread", sum(r is None for r in readings), "of", len(readings))
    print("same", [r.text for r in readings[:16]] == reference)
""")


def test_out_of_memory_halves_the_batch_and_loses_no_line(tiny_model):
    result = subprocess.run([sys.executable, "-c", OOM_PROBE, str(tiny_model)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert int(lines["batch"]) < 2048, "the limit must have forced at least one back-off"
    assert lines["unread"] == "0 of 2048"
    assert lines["same"] == "True"
    assert "out of memory decoding 2048 lines" in result.stderr
