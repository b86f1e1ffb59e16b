"""Tests for llava_loop.data: formats, lazy decoding, validation, skip mode."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from llava_loop import data
from llava_loop.data import (
    BadSampleError,
    SkippedSample,
    VLDataset,
    as_dataset,
    load_image,
    load_llava_json,
    normalize_record,
    record_images,
)

RED = (200, 10, 10)


def _save(path, mode="RGB", size=(4, 3), color=RED, fmt=None, **kwargs):
    Image.new(mode, size, color).save(path, fmt, **kwargs)
    return path


def _llava(id_="s0", image="red.png", question="What colour?", answer="Red."):
    record = {
        "id": id_,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image is not None:
        record["image"] = image
    return record


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pixels(img):
    return img.mode, img.size, img.tobytes()


@pytest.fixture
def red_png(tmp_path):
    return _save(tmp_path / "red.png")


# --- formats -----------------------------------------------------------------------


def test_llava_json_jsonl_messages_and_memory_records_are_identical(tmp_path, red_png):
    llava = [
        {
            "id": "s0",
            "image": "red.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "user", "value": "<image>\nWhat colour?"},
                {"from": "assistant", "value": "Red."},
            ],
            "answers": ["red"],
        },
        _llava("s1", image=None, question="Hi", answer="Hello"),
    ]
    messages = [
        {
            "id": "s0",
            "images": ["red.png"],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "What colour?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            ],
            "answers": ["red"],
        },
        {
            "id": "s1",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ],
        },
    ]
    in_memory = [dict(llava[0], image=Image.open(red_png).convert("RGB")), llava[1]]
    datasets = {
        "json": load_llava_json(_write_json(tmp_path / "a.json", llava)),
        "jsonl": load_llava_json(_write_jsonl(tmp_path / "b.jsonl", llava)),
        "messages": load_llava_json(_write_jsonl(tmp_path / "c.jsonl", messages)),
        "memory": as_dataset(in_memory),
    }

    def comparable(record):
        return dict(record, image=record["image"] and _pixels(record["image"]))

    expected = [comparable(datasets["json"][i]) for i in range(2)]
    assert expected[0]["conversations"] == [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "Red."},
    ], f"LLaVA roles/values not normalised: {expected[0]['conversations']}"
    assert expected[0]["image"] == (
        "RGB",
        (4, 3),
        Image.new("RGB", (4, 3), RED).tobytes(),
    ), "image not decoded to the RGB pixels that were saved"
    assert expected[0]["answers"] == ["red"], "answers were not kept"
    assert expected[1]["image"] is None, "text-only record should have image None"
    for name, ds in datasets.items():
        got = [comparable(ds[i]) for i in range(len(ds))]
        assert got == expected, f"{name} records differ from LLaVA json records"


def test_normalize_record_returns_resolved_paths_without_decoding(tmp_path, red_png):
    record = normalize_record(_llava(), source=str(tmp_path / "train.json"))
    assert record == {
        "id": "s0",
        "image": str(tmp_path / "red.png"),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }, f"unexpected normalised record {record}"


def test_messages_content_items_place_image_markers_in_position(tmp_path, red_png):
    raw = {
        "images": [str(red_png), str(red_png)],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image"},
                    {"type": "text", "text": "and "},
                    {"type": "image"},
                ],
            },
            {"role": "assistant", "content": "Same."},
        ],
    }
    record = normalize_record(raw)
    assert record["conversations"][0]["value"] == "Compare <image>\nand <image>\n", (
        f"image items not turned into markers in place: {record['conversations'][0]}"
    )
    assert record["image"] == [str(red_png), str(red_png)], "two images should stay a list"


def test_messages_inline_image_paths_are_collected(red_png):
    raw = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "path": str(red_png)}, "Hi"],
            },
            {"role": "assistant", "content": "Red."},
        ]
    }
    record = normalize_record(raw)
    assert record["image"] == str(red_png), f"inline image path not collected: {record}"
    assert record["conversations"][0]["value"] == "<image>\nHi", "marker not placed"


def test_as_dataset_returns_existing_torch_dataset_unchanged():
    ds = torch.utils.data.TensorDataset(torch.zeros(2))
    assert as_dataset(ds) is ds, "an existing torch Dataset should be returned as is"


def test_as_dataset_rejects_unsupported_types():
    with pytest.raises(TypeError, match="list of records"):
        as_dataset(42)


# --- ids, paths, laziness ------------------------------------------------------------


def test_missing_ids_default_to_file_name_and_index_and_ids_become_strings(tmp_path):
    records = [_llava(image=None), _llava(image=None)]
    del records[0]["id"]
    records[1]["id"] = 7
    ds = load_llava_json(_write_json(tmp_path / "train.json", records))
    assert [ds[0]["id"], ds[1]["id"]] == ["train.json:0", "7"], "ids not defaulted/stringified"


def test_relative_paths_resolve_against_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _save(folder / "red.png")
    ds = load_llava_json(_write_json(tmp_path / "t.json", [_llava()]), image_folder=folder)
    assert ds[0]["image"].size == (4, 3), "image from image_folder not loaded"


def test_absolute_image_paths_are_kept(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    abs_path = str(_save(elsewhere / "red.png"))
    (tmp_path / "imgs").mkdir()
    record = normalize_record(
        _llava(image=abs_path),
        image_folder=tmp_path / "imgs",
        allow_external_images=True,
    )
    assert record["image"] == abs_path, f"absolute path was rewritten to {record['image']}"
    inside = str(_save(tmp_path / "imgs" / "red.png"))
    record = normalize_record(_llava(image=inside), image_folder=tmp_path / "imgs")
    assert record["image"] == inside, "an absolute path inside image_folder was refused"


# --- image paths outside the image folder -----------------------------------------------


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A data folder with images/, and an image outside it reachable five ways."""
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    secret = _save(tmp_path / "secret.png")
    home = tmp_path / "home"
    home.mkdir()
    _save(home / "me.png")
    monkeypatch.setenv("HOME", str(home))
    (folder / "link.png").symlink_to(secret)
    (folder / "sub").mkdir()
    return folder, {
        "dotdot": "../../secret.png",
        "dotdot-inside-first": "sub/../../../secret.png",
        "absolute": str(secret),
        "home": "~/me.png",
        "symlink-out": "link.png",
    }


@pytest.mark.parametrize("how", ["dotdot", "dotdot-inside-first", "absolute", "home", "symlink-out"])
@pytest.mark.parametrize("entry", ["load_llava_json", "as_dataset-records"])
def test_image_path_outside_image_folder_is_refused_unless_allowed(tmp_path, outside, how, entry):
    folder, paths = outside
    raw = _llava("escape", image=paths[how])
    json_path = _write_json(tmp_path / "data" / "train.json", [raw])

    def load(**kwargs):
        if entry == "load_llava_json":
            return load_llava_json(json_path, image_folder=folder, **kwargs)
        return as_dataset([raw], image_folder=folder, **kwargs)

    with pytest.raises(BadSampleError) as info:
        load()
    message = str(info.value)
    assert info.value.sample_id == "escape", f"error names {info.value.sample_id!r}"
    assert paths[how] in message, f"error does not name the path: {message}"
    assert "outside the image folder" in message, f"error does not say why: {message}"
    assert "allow_external_images=True" in message, f"error gives no way out: {message}"
    with pytest.raises(ValueError, match="all 1 were rejected"):
        load(on_bad_sample="skip")
    image = load(allow_external_images=True)[0]["image"]
    assert image.getpixel((0, 0)) == RED, "the allowed external image did not load"


def test_image_folder_defaults_to_the_json_folder_for_the_outside_check(tmp_path):
    _save(tmp_path / "red.png")
    (tmp_path / "data").mkdir()
    path = _write_json(tmp_path / "data" / "t.json", [_llava("up", image="../red.png")])
    with pytest.raises(BadSampleError, match="outside the image folder"):
        load_llava_json(path)
    assert load_llava_json(path, allow_external_images=True)[0]["image"].size == (4, 3), "allowed path did not load"


def test_records_without_an_image_folder_accept_any_path(tmp_path):
    absolute = str(_save(tmp_path / "red.png"))
    ds = as_dataset([_llava("mem", image=absolute)])
    assert ds[0]["image"].getpixel((0, 0)) == RED, (
        "in-memory record with an absolute path and no image_folder must keep working"
    )


def test_symlink_inside_the_image_folder_to_a_file_inside_is_fine(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _save(folder / "red.png")
    (folder / "alias.png").symlink_to(folder / "red.png")
    ds = as_dataset([_llava("alias", image="alias.png")], image_folder=folder)
    assert ds[0]["image"].getpixel((0, 0)) == RED, "a symlink inside the folder was refused"


def test_construction_does_not_decode_images(tmp_path, red_png, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    ds = load_llava_json(_write_json(tmp_path / "t.json", [_llava("a"), _llava("b")]))
    assert opened == [], "images were opened at construction; decoding must be lazy"
    ds[1]
    assert len(opened) == 1, f"expected exactly one decode for ds[1], got {len(opened)}"


def test_getitem_returns_a_fresh_dict_each_time(tmp_path, red_png):
    ds = load_llava_json(_write_json(tmp_path / "t.json", [_llava()]))
    first = ds[0]
    first["conversations"][0]["value"] = "mutated"
    first["id"] = "mutated"
    second = ds[0]
    assert second["id"] == "s0", "mutating a returned record changed the dataset's id"
    assert second["conversations"][0]["value"] == "<image>\nWhat colour?", (
        "mutating a returned record changed the dataset's conversations"
    )


# --- images -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "color", "fmt", "expected"),
    [
        ("RGB", RED, "JPEG", None),
        ("L", 80, "PNG", (80, 80, 80)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("RGBA", (0, 0, 255, 0), "PNG", (255, 255, 255)),
        ("RGBA", (0, 0, 255, 255), "PNG", (0, 0, 255)),
        ("LA", (0, 0), "PNG", (255, 255, 255)),
        ("P", 3, "PNG", None),
        ("CMYK", (0, 255, 255, 0), "JPEG", None),
    ],
)
def test_images_are_converted_to_rgb(tmp_path, mode, color, fmt, expected):
    path = _save(tmp_path / f"img.{fmt.lower()}", mode, color=color, fmt=fmt)
    img = load_image(path, sample_id="x", source="t.json")
    assert img.mode == "RGB", f"{mode} {fmt} loaded as {img.mode}, expected RGB"
    assert img.size == (4, 3), f"{mode} {fmt} changed size to {img.size}"
    if expected is not None:
        assert img.getpixel((0, 0)) == expected, f"{mode} pixel {img.getpixel((0, 0))}"


def test_transparent_palette_image_is_composited_on_white(tmp_path):
    path = _save(tmp_path / "p.png", "P", color=0, transparency=0)
    pixel = load_image(path, sample_id="x", source="t.json").getpixel((0, 0))
    assert pixel == (255, 255, 255), f"transparent palette pixel became {pixel}, not white"


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = _save(tmp_path / "g16.png", "I;16", color=32896)
    pixel = load_image(path, sample_id="x", source="t.json").getpixel((0, 0))
    assert pixel == (128, 128, 128), f"16-bit mid-grey became {pixel} (clipped?)"


def test_one_pixel_image_is_fine(tmp_path):
    path = _save(tmp_path / "tiny.png", size=(1, 1))
    assert load_image(path, sample_id="x", source="t").size == (1, 1), "1x1 image failed"


def test_in_memory_image_is_copied_not_modified():
    original = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    img = load_image(original, sample_id="x", source="<memory>")
    assert img is not original, "load_image must return a new image"
    assert original.mode == "RGBA", "the caller's image was modified"


def test_multiple_images_load_as_a_list(tmp_path, red_png):
    blue = _save(tmp_path / "blue.png", color=(0, 0, 255))
    raw = _llava(image=["red.png", "blue.png"], question="<image> vs <image>")
    record = load_llava_json(_write_json(tmp_path / "t.json", [raw]))[0]
    images = record_images(record)
    assert [im.getpixel((0, 0)) for im in images] == [RED, (0, 0, 255)], (
        f"images not loaded in order from {red_png}, {blue}"
    )


def test_record_images_returns_empty_single_or_list():
    img = Image.new("RGB", (1, 1))
    assert record_images({"image": None}) == [], "None should give []"
    assert record_images({"image": img}) == [img], "one image should give [img]"
    assert record_images({"image": [img, img]}) == [img, img], "list should be kept"
    with pytest.raises(TypeError, match="undecoded"):
        record_images({"id": "a", "image": "a.png"})


# --- markers ------------------------------------------------------------------------


def test_missing_marker_is_inserted_at_start_of_first_human_turn(red_png):
    raw = {
        "image": str(red_png),
        "conversations": [
            {"from": "system", "value": "Sys."},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ],
    }
    values = [t["value"] for t in normalize_record(raw)["conversations"]]
    assert values == ["Sys.", "<image>\nQ1", "A1", "Q2", "A2"], f"marker misplaced: {values}"


def test_one_marker_per_image_is_inserted_when_there_are_none(red_png):
    record = normalize_record(_llava(image=[str(red_png)] * 2))
    value = record["conversations"][0]["value"]
    assert value == "<image>\n<image>\nWhat colour?", f"expected two markers, got {value!r}"


def test_text_only_record_has_no_image_and_no_marker(tmp_path):
    ds = load_llava_json(_write_json(tmp_path / "t.json", [_llava(image=None)]))
    record = ds[0]
    assert record["image"] is None, "text-only record should have image None"
    assert record_images(record) == [], "text-only record should have no images"
    assert "<image>" not in record["conversations"][0]["value"], "marker added to text-only"


# --- structural errors (raise mode) -----------------------------------------------------


def _turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"id": "bad", "image": None}, "no 'conversations'"),
        ({"id": "bad", "conversations": "hi"}, "must be a list"),
        ({"id": "bad", "conversations": [{"value": "hi"}]}, "no 'from'"),
        ({"id": "bad", "conversations": [{"from": "human"}]}, "no 'value'"),
        (
            {"id": "bad", "conversations": _turns(("human", "q"), ("robot", "a"))},
            "unknown role 'robot'",
        ),
        (
            {"id": "bad", "conversations": [{"from": "human", "value": 3}]},
            "must be a string",
        ),
        ({"id": "bad", "conversations": _turns(("gpt", "a"))}, "no human"),
        ({"id": "bad", "conversations": _turns(("human", "q"))}, "no gpt"),
        (
            {"id": "bad", "conversations": _turns(("human", "q"), ("gpt", " \n"))},
            "empty answer",
        ),
        (
            {
                "id": "bad",
                "conversations": _turns(("human", "<image> q"), ("gpt", "a")),
            },
            "no image",
        ),
        (
            {
                "id": "bad",
                "image": "red.png",
                "conversations": _turns(("human", "q"), ("gpt", "<image> a")),
            },
            "only human turns",
        ),
        (
            {
                "id": "bad",
                "image": "red.png",
                "conversations": _turns(("human", "<image><image> q"), ("gpt", "a")),
            },
            "more <image> markers (2) than images (1)",
        ),
        (
            {
                "id": "bad",
                "image": ["red.png", "red.png"],
                "conversations": _turns(("human", "<image> q"), ("gpt", "a")),
            },
            "fewer <image> markers (1) than images (2)",
        ),
        (
            {
                "id": "bad",
                "image": "missing.jpg",
                "conversations": _turns(("human", "q"), ("gpt", "a")),
            },
            "image file not found",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_structural_errors_name_sample_file_and_reason(tmp_path, red_png, raw, reason):
    path = _write_json(tmp_path / "train.json", [_llava("ok"), raw])
    with pytest.raises(BadSampleError) as info:
        load_llava_json(path)
    message = str(info.value)
    assert "'bad'" in message, f"message does not name the sample id: {message}"
    assert str(path) in message, f"message does not name the file: {message}"
    assert reason in message, f"message does not say {reason!r}: {message}"
    assert "on_bad_sample='skip'" in message, f"message does not say what to do: {message}"
    assert (info.value.sample_id, info.value.source) == ("bad", str(path)), "BadSampleError attributes wrong"


def test_invalid_json_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 3, column 22"):
        load_llava_json(path)


def test_invalid_jsonl_error_names_the_bad_line(tmp_path):
    good = json.dumps(_llava(image=None))
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{good}\n\n{good}\n{{oops\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: invalid JSON at line 4, column 2"):
        load_llava_json(path)


def test_top_level_that_is_not_a_list_is_rejected(tmp_path):
    path = _write_json(tmp_path / "obj.json", _llava(image=None))
    with pytest.raises(ValueError, match="top level must be a JSON list"):
        load_llava_json(path)


def test_bad_on_bad_sample_value_is_rejected():
    with pytest.raises(ValueError, match="on_bad_sample must be"):
        as_dataset([_llava(image=None)], on_bad_sample="ignore")


def test_on_bad_sample_value_is_checked_by_one_rule_in_config_datasets_and_collators():
    from llava_loop.collators import EvalCollator, TrainCollator
    from llava_loop.config import LoopConfig
    from llava_loop.testing import tiny_processor

    builders = {
        "LoopConfig": lambda: LoopConfig(on_bad_sample="ignore"),
        "as_dataset": lambda: as_dataset([_llava(image=None)], on_bad_sample="ignore"),
        "VLDataset": lambda: VLDataset([_llava(image=None)], on_bad_sample="ignore"),
        "TrainCollator": lambda: TrainCollator(tiny_processor(), on_bad_sample="ignore"),
        "EvalCollator": lambda: EvalCollator(tiny_processor(), on_bad_sample="ignore"),
    }
    messages = {}
    for name, build in builders.items():
        with pytest.raises(ValueError) as info:
            build()
        messages[name] = str(info.value)
    assert len(set(messages.values())) == 1, f"one rule should give one message: {messages}"
    assert "'ignore'" in messages["LoopConfig"] and "'skip'" in messages["LoopConfig"], (
        f"the message should name the value and what is allowed: {messages['LoopConfig']}"
    )


def test_bad_sample_error_survives_pickling():
    err = pickle.loads(pickle.dumps(BadSampleError("a", "t.json", "why")))
    assert (err.sample_id, err.source, err.reason) == ("a", "t.json", "why"), (
        "BadSampleError lost its fields when pickled (DataLoader workers pickle errors)"
    )


# --- image errors (lazy, raise mode) -----------------------------------------------------


def _truncated_jpeg(tmp_path):
    full = _save(tmp_path / "full.jpg", size=(64, 64), fmt="JPEG")
    path = tmp_path / "half.jpg"
    raw = full.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _not_an_image(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a JPEG")
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_truncated_jpeg, "OSError"), (_not_an_image, "UnidentifiedImageError")],
    ids=["truncated-jpeg", "not-an-image"],
)
def test_unreadable_image_raises_at_getitem_naming_sample_and_file(tmp_path, make, reason):
    image = make(tmp_path)
    path = _write_json(tmp_path / "train.json", [_llava("bad", image=image.name)])
    ds = load_llava_json(path)  # construction only checks the file exists
    with pytest.raises(BadSampleError) as info:
        ds[0]
    message = str(info.value)
    assert "'bad'" in message, f"message does not name the sample id: {message}"
    assert str(path) in message and str(image) in message, f"files not named: {message}"
    assert reason in message, f"message does not say {reason!r}: {message}"


def test_decompression_bomb_error_says_how_to_raise_the_limit(tmp_path, monkeypatch):
    _save(tmp_path / "big.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSampleError, match=r"PIL\.Image\.MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png", sample_id="big", source="t.json")


def test_zero_size_image_is_rejected():
    with pytest.raises(BadSampleError, match="zero size"):
        load_image(Image.new("RGB", (0, 3)), sample_id="z", source="<memory>")


# --- skip mode -------------------------------------------------------------------------


def test_skip_mode_excludes_bad_records_at_construction_and_logs(tmp_path, red_png, caplog):
    records = [
        _llava("ok1"),
        _llava("no-answer", answer=""),
        _llava("missing", image="missing.png"),
        _llava("ok2", image=None),
    ]
    path = _write_json(tmp_path / "t.json", records)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        ds = load_llava_json(path, on_bad_sample="skip")
    assert [ds[i]["id"] for i in range(len(ds))] == ["ok1", "ok2"], "wrong records kept"
    assert [s.id for s in ds.skipped] == ["no-answer", "missing"], "skipped not recorded"
    assert all(s.source == str(path) for s in ds.skipped), "skipped source not the file"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'no-answer'" in w for w in warnings), f"no warning for no-answer: {warnings}"
    assert any("'missing'" in w for w in warnings), f"no warning for missing: {warnings}"
    assert any("skipped 2 of 4" in w for w in warnings), f"no summary warning: {warnings}"


def test_skip_mode_returns_skipped_sample_for_unreadable_image(tmp_path, red_png, caplog):
    fake = _not_an_image(tmp_path)
    path = _write_json(tmp_path / "t.json", [_llava("ok"), _llava("bad", image=fake.name)])
    ds = load_llava_json(path, on_bad_sample="skip")
    assert len(ds) == 2, "image problems must not be detected (decoded) at construction"
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        item = ds[1]
    assert isinstance(item, SkippedSample), f"expected SkippedSample, got {type(item)}"
    assert (item.id, item.source) == ("bad", str(path)), f"wrong SkippedSample {item}"
    assert str(fake) in item.reason, f"reason does not name the image: {item.reason}"
    assert any("'bad'" in r.getMessage() for r in caplog.records), "skip was not logged"
    assert isinstance(ds[0], dict), "good record should still load"


def test_all_records_rejected_is_an_error():
    with pytest.raises(ValueError, match="all 1 were rejected"):
        VLDataset([_llava("a", answer="")], on_bad_sample="skip")


# --- turn order ---------------------------------------------------------------------------

BAD_ORDERS = {
    "starts-with-gpt": ([("gpt", "Hello."), ("human", "Hi"), ("gpt", "a")], "turn 0 is 'gpt'"),
    "two-humans": ([("human", "q1"), ("human", "q2"), ("gpt", "a")], "turn 1 is 'human'"),
    "two-gpts": ([("human", "q"), ("gpt", "a1"), ("gpt", "a2")], "turn 2 is 'gpt'"),
    "ends-with-human": ([("human", "q"), ("gpt", "a"), ("human", "q2")], "last turn (2)"),
    "system-not-first": ([("human", "q"), ("system", "s"), ("gpt", "a")], "turn 1 is a system"),
    "two-systems": ([("system", "s"), ("system", "t"), ("human", "q"), ("gpt", "a")], "turn 1 is a system"),
}
_HF_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _as_format(fmt, rid, pairs):
    if fmt == "messages":
        return {"id": rid, "messages": [{"role": _HF_ROLES[r], "content": v} for r, v in pairs]}
    return {"id": rid, "conversations": _turns(*pairs)}


@pytest.mark.parametrize("fmt", ["llava-json", "messages-jsonl", "messages", "memory"])
@pytest.mark.parametrize("name", list(BAD_ORDERS))
def test_turn_order_is_checked_at_load_time_for_every_format(tmp_path, name, fmt):
    pairs, reason = BAD_ORDERS[name]
    raw = _as_format("messages" if "messages" in fmt else "llava", name, pairs)
    good = _as_format("messages" if "messages" in fmt else "llava", "good", [("human", "q"), ("gpt", "a")])
    if fmt == "llava-json":
        source = str(_write_json(tmp_path / "t.json", [good, raw]))
    elif fmt == "messages-jsonl":
        source = str(_write_jsonl(tmp_path / "t.jsonl", [good, raw]))
    else:
        source = "<memory>"

    def load(on_bad_sample="raise"):
        data = [good, raw] if source == "<memory>" else source
        return as_dataset(data, on_bad_sample=on_bad_sample)

    with pytest.raises(BadSampleError) as info:
        load()
    assert (info.value.sample_id, info.value.source) == (name, source), (
        f"error names {info.value.sample_id!r} ({info.value.source}), not {name!r} ({source})"
    )
    assert "turn order" in info.value.reason and reason in info.value.reason, (
        f"reason does not say {reason!r}: {info.value.reason}"
    )
    assert "[system], human, gpt" in info.value.reason, f"reason does not state the accepted order: {info.value.reason}"
    ds = load("skip")
    assert [ds[i]["id"] for i in range(len(ds))] == ["good"], f"{name} was not skipped"
    assert [s.id for s in ds.skipped] == [name], f"skipped {ds.skipped}"


def test_accepted_turn_orders_load():
    for pairs in (
        [("human", "q"), ("gpt", "a")],
        [("system", "s"), ("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "a2")],
    ):
        record = normalize_record({"conversations": _turns(*pairs)})
        assert [t["from"] for t in record["conversations"]] == [r for r, _ in pairs], f"{pairs} changed when normalised"


# --- image decoding: orientation, bit depth, frames ----------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    # Stored sideways: left half red, right half blue; orientation 6 = rotate 90° clockwise to view.
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{fmt.lower()}"
    img.save(path, fmt, exif=exif, **({"quality": 95} if fmt != "PNG" else {}))
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == 6, f"test setup: {fmt} did not keep the orientation tag"
    out = load_image(path, sample_id="x", source="t.json")
    assert out.size == (16, 32), f"{fmt}: orientation 6 not applied, size {out.size}"
    top, bottom = out.getpixel((8, 4)), out.getpixel((8, 27))
    assert top[0] > 200 and top[2] < 50, f"{fmt}: top should be red after rotating, is {top}"
    assert bottom[2] > 200 and bottom[0] < 50, f"{fmt}: bottom should be blue, is {bottom}"


def test_exif_orientation_of_in_memory_image_is_applied_once():
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))
    img.getexif()[0x0112] = 6
    once = load_image(img, sample_id="x", source="<memory>")
    twice = load_image(once, sample_id="x", source="<memory>")
    assert once.size == (2, 4) and once.getpixel((1, 0)) == (255, 0, 0), (
        f"in-memory orientation 6 not applied: size {once.size}"
    )
    assert _pixels(twice) == _pixels(once), "loading an already upright image rotated it again"


def _gradient(mode, top, fmt, tmp_path, width=256):
    values = np.linspace(0, top, width)[None, :].repeat(3, axis=0)
    if mode == "F":
        img = Image.fromarray(values.astype(np.float32))
    elif mode == "I":
        img = Image.fromarray(np.rint(values).astype(np.int32))
    else:  # I;16 / I;16B from raw 16-bit bytes in that byte order
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (width, 3), np.rint(values).astype(dtype).tobytes())
    path = tmp_path / f"gradient.{fmt.lower()}"
    img.save(path, fmt)
    with Image.open(path) as check:
        assert check.mode == mode, f"test setup: {fmt} saved {mode} as {check.mode}"
    return path, np.rint(values[0] * 255 / top).astype(int)


@pytest.mark.parametrize(
    ("mode", "top", "fmt"),
    [
        ("I;16", 65535, "PNG"),
        ("I;16", 65535, "TIFF"),
        ("I;16B", 65535, "TIFF"),
        ("I", 65535, "TIFF"),
        ("F", 1.0, "TIFF"),
    ],
)
def test_high_bit_depth_gradient_keeps_its_gradient(tmp_path, mode, top, fmt):
    path, expected = _gradient(mode, top, fmt, tmp_path)
    out = load_image(path, sample_id="x", source="t.json")
    got = np.asarray(out)
    assert out.mode == "RGB", f"{mode} loaded as {out.mode}"
    assert (got[..., 0] == got[..., 2]).all(), f"{mode}: grey became coloured"
    assert (np.abs(got[0, :, 0].astype(int) - expected) <= 1).all(), (
        f"{mode} {fmt}: gradient 0..{top} became {got[0, ::32, 0].tolist()}, expected {expected[::32].tolist()}"
    )


@pytest.mark.parametrize(("mode", "top"), [("F", 255.0), ("F", -1.0), ("I", 70000)])
def test_high_bit_depth_values_outside_the_mode_range_are_refused(tmp_path, mode, top):
    path, _ = _gradient(mode, top, "TIFF", tmp_path)
    with pytest.raises(BadSampleError) as info:
        load_image(path, sample_id="deep", source="t.json")
    message = str(info.value)
    assert "'deep'" in message and str(path) in message, f"sample/file not named: {message}"
    assert "convert the image to 8-bit" in message, f"no fix given: {message}"


def _frames(path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2, f"test setup: {fmt} has one frame"
    return path


@pytest.mark.parametrize(("fmt", "ext"), [("GIF", "gif"), ("TIFF", "tif"), ("PNG", "png")])
def test_multi_frame_image_gives_first_frame_with_one_warning(tmp_path, monkeypatch, caplog, fmt, ext):
    monkeypatch.setattr(data, "_warned_multi_frame", False)
    first = _frames(tmp_path / f"a.{ext}", fmt)
    second = _frames(tmp_path / f"b.{ext}", fmt)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        pixels = [load_image(p, sample_id="m", source="t").getpixel((0, 0)) for p in (first, second, first)]
    assert all(p[0] > 240 and p[2] < 15 for p in pixels), f"{fmt}: not the first (red) frame: {pixels}"
    warnings = [r.getMessage() for r in caplog.records if "frames" in r.getMessage()]
    assert len(warnings) == 1, f"{fmt}: expected one multi-frame warning, got {warnings}"
    assert str(first) in warnings[0] and "first frame" in warnings[0], f"warning unclear: {warnings[0]}"
