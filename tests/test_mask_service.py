"""Inspection masks through the command line (``eagle build-bank --mask``) and the HTTP API (``POST /v1/banks`` with
``mask`` / ``mask_polygons``), with the real random-weight expert at 128 px input (a 16 × 16 patch grid).

The references are flat grey with noise; the defects are red squares painted on the first reference, one at the far
left (outside the mask: the right half) and one inside it.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expert.bank import load_bank
from tests.cli_helpers import run_cli as _run
from tests.service_helpers import TOKEN, LiveServer, assert_error, zip_bytes
from tests.synthetic import noisy_part, part_with_red_square

pytestmark = pytest.mark.slow

SIZE = 96
OUTSIDE = (2, 40, 14, 56)  # x0, y0, x1, y1 at the far left: the receptive field of the mask's patches misses it
INSIDE = (70, 36, 90, 60)
RIGHT_HALF = [[[48, 0], [95, 0], [95, 95], [48, 95]]]
MILLION_POINTS = [[i % SIZE, (i // SIZE) % SIZE] for i in range(1_000_000)]
POINT_LIMIT = "mask polygons: 1,000,000 points, more than the 100,000 accepted"
EMPTY_FILE = "the mask file is empty (0 bytes); expected a PNG, white = inspected, black = ignored"
EXPERT = {
    "weights": "random",
    "resize": 128,
    "crop": 128,
    "min_references": 2,
    "recommended_references": 2,
}


def normal_part(seed: int) -> np.ndarray:
    return noisy_part(seed, SIZE)


def defective_part(box: tuple[int, int, int, int]) -> np.ndarray:
    return part_with_red_square(box, SIZE)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_png() -> bytes:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    return _png(mask)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mask-service")
    normals = root / "normals"
    normals.mkdir()
    for i in range(6):
        (normals / f"good-{i}.png").write_bytes(_png(normal_part(i)))
    (root / "outside.png").write_bytes(_png(defective_part(OUTSIDE)))
    (root / "inside.png").write_bytes(_png(defective_part(INSIDE)))
    (root / "mask.png").write_bytes(_mask_png())
    (root / "mask.json").write_text(json.dumps({"width": SIZE, "height": SIZE, "polygons": RIGHT_HALF}))
    (root / "bad.json").write_text(json.dumps({"polygons": []}))
    (root / "empty.png").write_bytes(b"")
    (root / "huge.json").write_text(json.dumps({"width": SIZE, "height": SIZE, "polygons": [MILLION_POINTS]}))
    return root


@pytest.fixture(scope="module")
def env(data):
    values = {f"EAGLE_EXPERT__{k.upper()}": str(v) for k, v in EXPERT.items()}
    values.update({"EAGLE_DATA_DIR": str(data / "home"), "EAGLE_MLLM__ENABLED": "false"})
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield values


# ------------------------------------------------------------------------------------------- CLI


def test_cli_build_bank_with_a_polygon_mask_ignores_a_defect_outside_it(data, env):
    code, out, err = _run(
        ["build-bank", "--normals", str(data / "normals"), "--name", "cli", "--mask", str(data / "mask.json"), "--json"]
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["mask"] == {"patches": 128, "source": "polygons:mask.json 96x96"}
    bank_dir = data / "home" / "banks" / "cli"
    assert load_bank(bank_dir).mask[:, 8:].all() and not load_bank(bank_dir).mask[:, :8].any()
    code, out, err = _run(
        ["score", "--bank", str(bank_dir), str(data / "outside.png"), str(data / "inside.png"), "--json"]
    )
    assert code == 0, err
    outside, inside = (json.loads(line) for line in out.splitlines())
    assert outside["decision"] == "normal" and outside["boxes"] == []
    assert inside["decision"] == "anomalous" and all(box["x1"] > SIZE // 2 for box in inside["boxes"])
    # the same mask as a PNG gives the same bank contents (the source differs, so the id does too)
    code, out, err = _run(
        ["build-bank", "--normals", str(data / "normals"), "--name", "cli-png", "--mask", str(data / "mask.png")]
    )
    assert code == 0, err
    assert "128 of 256 patches inspected (png:mask.png 96x96)" in out
    assert (load_bank(data / "home" / "banks" / "cli-png").mask == load_bank(bank_dir).mask).all()
    code, out, err = _run(["bank", "show", "cli", "--json"])
    assert code == 0, err
    assert json.loads(out)["mask"] == "128 of 256 patches (polygons:mask.json 96x96)"


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ("missing.png", "is not a file"),
        ("bad.json", "'polygons' must be a non-empty list"),
        ("empty.png", f"empty.png: {EMPTY_FILE}"),
        ("huge.json", POINT_LIMIT),
        ("outside.png", None),
    ],
)
def test_cli_build_bank_refuses_a_bad_mask(data, env, mask, message):
    code, out, err = _run(
        ["build-bank", "--normals", str(data / "normals"), "--name", "bad", "--mask", str(data / mask)]
    )
    if message is None:  # an RGB photo is a valid (if odd) mask: its bright pixels are inside, and it says so
        assert code == 0, err
        assert "(png:outside.png 96x96; not black-and-white: " in out
        assert "read as inspected where luminance >= 128 and, in a PNG with transparency, alpha >= 128" in out
        return
    assert code != 0 and message in err and "object at" not in err
    assert not (data / "home" / "banks" / "bad").exists()


# ------------------------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def server(data):
    from deploy.api import create_app
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings

    settings = Settings(data_dir=data / "api-home", expert=EXPERT, mllm={"enabled": False}, service={"token": TOKEN})
    live = LiveServer(create_app(Pipeline(settings), settings)).start()
    yield live
    live.stop()


def _wait(client, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def _archive(data: Path) -> bytes:
    return zip_bytes({f"good/{p.name}": p.read_bytes() for p in sorted((data / "normals").glob("*.png"))})


def _inspect(client, path: Path, bank: str) -> dict:
    response = client.post(
        "/v1/inspect", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"bank": bank}
    )
    assert response.status_code == 200, response.text
    return response.json()["result"]


def test_api_builds_a_bank_with_a_mask_png_and_ignores_a_defect_outside_it(data, server):
    with server.client() as client:
        response = client.post(
            "/v1/banks",
            data={"name": "api"},
            files={"archive": ("good.zip", _archive(data)), "mask": ("mask.png", _mask_png(), "image/png")},
        )
        assert response.status_code == 202, response.text
        job = _wait(client, response.json()["id"])
        assert job["state"] == "succeeded", job
        meta = load_bank(data / "api-home" / "banks" / "api").meta
        assert meta.mask is not None and meta.mask.patches == 128 and meta.format_version == 2
        outside, inside = (_inspect(client, data / name, "api") for name in ("outside.png", "inside.png"))
        assert outside["verdict"] == "no_defect" and inside["verdict"] == "defect"


def test_api_polygons_without_a_size_take_the_first_reference_size(data, server):
    with server.client() as client:
        response = client.post(
            "/v1/banks",
            data={"name": "api-poly", "mask_polygons": json.dumps({"polygons": RIGHT_HALF})},
            files={"archive": ("good.zip", _archive(data))},
        )
        assert response.status_code == 202, response.text
        assert _wait(client, response.json()["id"])["state"] == "succeeded"
    assert load_bank(data / "api-home" / "banks" / "api-poly").meta.mask.patches == 128


def test_api_says_the_form_field_limit_for_a_huge_polygon_mask(data, server):
    with server.client() as client:
        response = client.post(
            "/v1/banks",
            data={"name": "refused", "mask_polygons": json.dumps({"polygons": MILLION_POINTS})},
            files={"archive": ("good.zip", _archive(data))},
        )
    body = assert_error(response, 422, "invalid_request")
    assert body["error"]["message"].startswith(
        "a form field is larger than 64 KiB, the limit for text fields (mask_polygons included: a few thousand points "
        "at most; send a larger inspection mask as a PNG in the file part mask, white = inspected)"
    )


def test_api_builds_with_a_grey_png_mask_and_says_how_it_was_read(data, server):
    grey = np.full((SIZE, SIZE), 60, np.uint8)
    grey[:, SIZE // 2 :] = 190  # a grey-level picture: bright half inspected
    with server.client() as client:
        response = client.post(
            "/v1/banks",
            data={"name": "api-grey"},
            files={"archive": ("good.zip", _archive(data)), "mask": ("grey.png", _png(grey), "image/png")},
        )
        assert response.status_code == 202, response.text
        assert _wait(client, response.json()["id"])["state"] == "succeeded"
    meta = load_bank(data / "api-home" / "banks" / "api-grey").meta
    assert meta.mask.patches == 128
    assert meta.mask.source.endswith(
        "96x96; not black-and-white: 100 % of its pixels are grey, coloured or half-transparent; read as inspected "
        "where luminance >= 128 and, in a PNG with transparency, alpha >= 128"
    )


@pytest.mark.parametrize(
    ("fields", "files", "message"),
    [
        ({"mask_polygons": "{"}, {}, "not valid JSON"),
        ({"mask_polygons": json.dumps({"polygons": [[[0, 0], [1, 1]]]})}, {}, "at least 3"),
        ({}, {"mask": ("mask.png", b"not a png", "image/png")}, "not a readable image"),
        ({}, {"mask": ("mask.png", _png(np.zeros((8, 8), np.uint8)), "image/png")}, "the mask is empty"),
        ({"mask_polygons": json.dumps({"polygons": RIGHT_HALF})}, {"mask": ("m.png", b"x", "image/png")}, "not both"),
        ({}, {"mask": ("mask.png", b"", "image/png")}, f"mask: {EMPTY_FILE}"),
    ],
)
def test_api_refuses_a_bad_mask_before_queueing(data, server, fields, files, message):
    with server.client() as client:
        response = client.post(
            "/v1/banks",
            data={"name": "refused", **fields},
            files={"archive": ("good.zip", _archive(data)), **files},
        )
        body = assert_error(response, 422, "invalid_mask")
        assert message in json.dumps(body)
        assert client.get("/v1/jobs").json()["jobs"] == [] or all(
            job["bank"] != "refused" for job in client.get("/v1/jobs").json()["jobs"]
        )
