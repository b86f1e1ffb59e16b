"""Hugging Face datasets in (every layout trains end to end, lazily, validated like JSON records, resumable)
and out (`to_llava_json` / `llava-loop convert`: VQA and caption datasets to LLaVA JSON that trains)."""

from __future__ import annotations

import io
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from helpers import child_env, small_config
from llava_loop import Loop, fit
from llava_loop.cli import main
from llava_loop.data import BadSampleError, as_dataset, load_llava_json, longest_prompts_first
from llava_loop.hf_datasets import VQA_PROMPT, to_llava_json
from llava_loop.loggers import read_metrics
from llava_loop.metrics.vqa import _vqa_normalize
from llava_loop.rundir import data_fingerprint
from llava_loop.testing import COLORS as DRAWN_COLORS
from llava_loop.testing import synthetic_okvqa, synthetic_vqa, tiny_llava

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250)}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets writes the Arrow cache of load_dataset(...) into tmp_path, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _question(record) -> str:
    return record["conversations"][0]["value"].replace("<image>\n", "")


def _answer(record) -> str:
    return record["conversations"][1]["value"]


def trl_rows(records) -> list[dict]:
    """TRL's VLM layout (HuggingFaceH4/llava-instruct-mix-vsft): content lists with index/text/type, an images list."""
    return [
        {
            "messages": [
                {"role": "user", "content": [{"index": 0, "text": None, "type": "image"},
                                             {"index": None, "text": _question(r), "type": "text"}]},
                {"role": "assistant", "content": [{"index": None, "text": _answer(r), "type": "text"}]},
            ],
            "images": [r["image"]],
            "answers": r["answers"],
        }
        for r in records
    ]  # fmt: skip


def jpeg(color, size=(16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def color_rows(n: int) -> list[dict]:
    """LLaVA-layout rows whose answer names the colour of their one-colour image."""
    names = list(COLORS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        rows.append({
            "id": f"c{i}",
            "conversations": [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": name}],
            "image": Image.new("RGB", (8, 8), COLORS[name]),
        })  # fmt: skip
    return rows


def run_fit(out, train, eval_data=None, **settings) -> Loop:
    model, processor = tiny_llava(seed=0)
    config = small_config(out, **{"max_steps": 2, "max_new_tokens": 2, "log_steps": 1, **settings})
    return fit(model, processor, train, eval_data, config=config, metrics=["exact_match"])


class CountDecodes:
    """Counts image decodes: every PIL.Image.open (llava_loop's decode) and datasets.Image.decode_example."""

    def __init__(self, monkeypatch):
        self.opens, self.datasets_decodes = 0, 0
        open_, decode = Image.open, datasets.Image.decode_example

        def counting_open(*args, **kwargs):
            self.opens += 1
            return open_(*args, **kwargs)

        def counting_decode(feature, *args, **kwargs):
            self.datasets_decodes += 1
            return decode(feature, *args, **kwargs)

        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(datasets.Image, "decode_example", counting_decode)

    @property
    def total(self) -> int:
        return self.opens + self.datasets_decodes


# ---------------------------------------------------------------------- layouts, end to end
def test_trl_layout_trains_and_evaluates_end_to_end(tmp_path):
    records = synthetic_vqa(8, seed=0)
    ds = datasets.Dataset.from_list(trl_rows(records))
    assert isinstance(ds.features["images"].feature, datasets.Image), "test setup: images should be an Image list"
    data = as_dataset(ds)
    first = data[0]
    assert first["conversations"] == [
        {"from": "human", "value": "<image>\n" + _question(records[0])},
        {"from": "gpt", "value": _answer(records[0])},
    ], f"the TRL content list should become one marker then the text: {first['conversations']}"
    assert first["id"] == "row[0]" and first["answers"] == records[0]["answers"], first
    assert first["image"].tobytes() == records[0]["image"].convert("RGB").tobytes(), "row 0 came with another image"
    copy = pickle.loads(pickle.dumps(data))  # as DataLoader workers started by spawn get it
    assert copy[3]["image"].tobytes() == data[3]["image"].tobytes(), "a pickled copy reads other images"
    loop = run_fit(tmp_path, ds, ds.select(range(4)))
    assert loop.state.step == 2, "the TRL-layout dataset did not train"
    assert loop.state.history[-1]["eval/samples"] == 4, f"evaluation should see 4 rows: {loop.state.history}"


@pytest.mark.parametrize("stored", ["image feature", "paths"])
def test_llava_layout_with_an_image_column_trains_end_to_end(tmp_path, monkeypatch, stored):
    rows = color_rows(6)
    if stored == "paths":
        folder = tmp_path / "images"
        folder.mkdir()
        for row in rows:
            row["image"].save(folder / f"{row['id']}.png")
            row["image"] = f"{row['id']}.png"
        monkeypatch.chdir(folder)  # relative paths resolve against the current directory by default
    ds = datasets.Dataset.from_list(rows)
    assert isinstance(ds.features["image"], datasets.Image if stored == "image feature" else datasets.Value)
    data = as_dataset(ds)
    assert [data[i]["image"].getpixel((0, 0)) for i in range(3)] == [COLORS[r] for r in ("red", "green", "blue")]
    assert data[0]["id"] == "c0", "the id column should give the ids"
    loop = run_fit(tmp_path / "run", ds)
    assert loop.state.step == 2, f"the LLaVA layout with {stored} did not train"


def test_string_image_paths_resolve_against_image_folder_and_stay_inside_it(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (4, 4), "red").save(folder / "in.png")
    Image.new("RGB", (4, 4), "red").save(tmp_path / "outside.png")
    turns = [{"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "red"}]
    ds = datasets.Dataset.from_list([{"conversations": turns, "image": "in.png"}])
    assert as_dataset(ds, image_folder=folder)[0]["image"].size == (4, 4)
    outside = datasets.Dataset.from_list([{"conversations": turns, "image": str(tmp_path / "outside.png")}])
    with pytest.raises(BadSampleError, match="leads outside the image folder"):
        as_dataset(outside, image_folder=folder)
    assert len(as_dataset(outside, image_folder=folder, allow_external_images=True)) == 1


def test_messages_with_string_content_from_load_dataset_json_in_torch_format_train(tmp_path):
    """load_dataset("json", data_files=...) of HF messages records with image paths, set to torch format."""
    records = synthetic_vqa(6, seed=2)
    lines = []
    for i, r in enumerate(records):
        r["image"].save(tmp_path / f"{i}.png")
        messages = [{"role": "user", "content": _question(r)}, {"role": "assistant", "content": _answer(r)}]
        lines.append(json.dumps({"id": i, "messages": messages, "images": [f"{i}.png"]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train").with_format("torch")
    data = as_dataset(ds, image_folder=tmp_path)
    assert data[1]["id"] == "1" and data[1]["conversations"][0]["value"] == "<image>\n" + _question(records[1])
    loop = run_fit(tmp_path / "run", as_dataset(ds, image_folder=tmp_path))
    assert loop.state.step == 2, "messages with string content did not train"


def test_messages_mixing_string_and_list_content_stored_as_json_are_read():
    messages = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        [{"role": "user", "content": [{"type": "text", "text": "Hey"}]}, {"role": "assistant", "content": "Ho"}],
    ]
    ds = datasets.Dataset.from_dict({"messages": messages}, on_mixed_types="use_json")
    assert isinstance(ds.features["messages"].feature["content"], datasets.Json), "test setup: content should be Json"
    data = as_dataset(ds)
    assert [data[i]["conversations"][0]["value"] for i in range(2)] == ["Hi", "Hey"]


def test_rows_keep_their_own_images_after_shuffle_select_filter_and_split():
    rows = color_rows(12)
    for row in rows:  # stored with a file name, which the fingerprint reads
        png = io.BytesIO()
        row["image"].save(png, "PNG")
        row["image"] = {"bytes": png.getvalue(), "path": f"{row['id']}.png"}
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    views = {
        "shuffle": ds.shuffle(seed=1),
        "select range": ds.select(range(3, 9)),
        "select list": ds.select([11, 0, 5]),
        "filter": ds.filter(lambda row: row["conversations"][1]["value"] != "red"),
        "train_test_split": ds.train_test_split(test_size=0.5, seed=0)["test"],
    }
    for what, view in views.items():
        data = as_dataset(view)
        for i in range(len(data)):
            record = data[i]
            expected = COLORS[record["conversations"][1]["value"]]
            assert record["image"].getpixel((0, 0)) == expected, f"{what}: row {i} ({record['id']}) got another image"
            assert record["id"] == view[i]["id"], f"{what}: row {i} is {record['id']}, the dataset says {view[i]['id']}"
            name = data.parsed_records[i]["image"].name
            assert name == f"{record['id']}.png", f"{what}: row {i} ({record['id']}) has the file name {name!r}"


# ---------------------------------------------------------------------- validation, laziness, splits, resume
def test_rows_are_validated_exactly_like_json_records():
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    bad = {
        "no answer": [{"from": "human", "value": "Hi"}],
        "bad role": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
        "empty answer": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}],
        "marker without image": [{"from": "human", "value": "<image> Hi"}, {"from": "gpt", "value": "Yo"}],
    }
    for what, turns in bad.items():
        rows = [good, {"id": None, "conversations": turns}]
        with pytest.raises(BadSampleError) as from_json:
            as_dataset([{"conversations": turns}])
        with pytest.raises(BadSampleError) as from_hf:
            as_dataset(datasets.Dataset.from_list(rows, split="train"))
        assert from_hf.value.reason == from_json.value.reason, f"{what}: {from_hf.value.reason!r}"
        assert from_hf.value.sample_id == "train[1]", f"{what}: the row should be named train[1]: {from_hf.value}"
        assert "HF dataset 'train'" in str(from_hf.value) and "on_bad_sample='skip'" in str(from_hf.value)
    rows = [good, {"id": "b1", "conversations": bad["no answer"]}, {"id": "ok", "conversations": good["conversations"]}]
    data = as_dataset(datasets.Dataset.from_list(rows), on_bad_sample="skip")
    assert len(data) == 2 and [s.id for s in data.skipped] == ["b1"], f"skip mode should count b1: {data.skipped}"


def test_duplicate_ids_are_warned_about(caplog):
    rows = [dict(row, id="same") for row in color_rows(3)]
    with caplog.at_level(logging.WARNING):
        as_dataset(datasets.Dataset.from_list(rows))
    assert any("appear more than once" in r.getMessage() for r in caplog.records), "no warning for repeated ids"


def test_building_the_dataset_and_the_fit_set_up_decode_no_image(tmp_path, monkeypatch):
    n = 200
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    turns = [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "red"}]
    ds = datasets.Dataset.from_dict(
        {"conversations": [turns] * n, "image": [{"bytes": png.getvalue(), "path": f"{i}.png"} for i in range(n)]},
        features=datasets.Features({
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
            "image": datasets.Image(),
        }),
    ).shuffle(seed=0)  # fmt: skip
    decodes = CountDecodes(monkeypatch)
    data = as_dataset(ds)
    data_fingerprint(data)
    longest_prompts_first(data, n, tiny_llava(seed=0)[1].tokenizer, image_tokens=4)
    assert decodes.total == 0, f"building the dataset, its fingerprint and the eval order decoded {decodes.total}"

    class AtFitStart:  # fires right after fit's set-up (data, fingerprint, model, optimizer, loader)
        def on_fit_start(self, loop):
            self.decodes = decodes.total

    model, processor = tiny_llava(seed=0)
    at_start = AtFitStart()
    fit(model, processor, data, config=small_config(tmp_path, max_steps=1, batch_size=2), callbacks=[at_start])
    assert at_start.decodes == 0, f"fit's set-up decoded {at_start.decodes} images"
    assert decodes.datasets_decodes == 0, "datasets decoded images: llava_loop should read the stored bytes itself"
    # The step's batch, and the next one, which accelerate's loader reads ahead.
    assert 2 <= decodes.opens <= 4, f"one step of batch 2 should decode 2 to 4 of {n} images: {decodes.opens}"
    garbage = (
        ds.cast_column("image", datasets.Image(decode=False))
        .map(lambda row: {"image": {"bytes": b"not an image", "path": None}})
        .cast_column("image", datasets.Image())
    )
    lazy = as_dataset(garbage, on_bad_sample="skip")  # builds: the bytes are never read at construction
    assert lazy[0].reason.startswith("cannot read image"), f"the bad bytes should show when indexed: {lazy[0]}"


def test_a_dataset_dict_trains_on_train_and_evaluates_on_validation(tmp_path, caplog):
    train, validation = (datasets.Dataset.from_list(color_rows(n)) for n in (6, 3))
    with caplog.at_level(logging.INFO, logger="llava_loop"):
        loop = run_fit(tmp_path / "a", datasets.DatasetDict({"train": train, "validation": validation}))
    assert loop.state.history[-1]["eval/samples"] == 3, "the validation split should be the eval data"
    assert any("evaluating on split 'validation'" in r.getMessage() for r in caplog.records), "the choice is not logged"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llava_loop"):
        loop = run_fit(tmp_path / "b", datasets.DatasetDict({"train": train, "test": validation}))
    assert not loop.state.history, "without a validation split there should be no eval data"
    assert any("eval_data=data['test']" in r.getMessage() for r in caplog.records), "the unused split is not named"
    with pytest.raises(ValueError, match=r"without a 'train' split \(splits: test\)"):
        run_fit(tmp_path / "c", datasets.DatasetDict({"test": train}))
    with pytest.raises(ValueError, match=r"pass one split, e.g. data\['train'\]"):
        as_dataset(datasets.DatasetDict({"train": train}))
    result = loop.evaluate(datasets.DatasetDict({"validation": validation}))
    assert result["eval/samples"] == 3, "evaluate(DatasetDict) should evaluate its validation split"
    with pytest.raises(ValueError, match=r"without a 'validation' split \(splits: train, test\)"):
        loop.evaluate(datasets.DatasetDict({"train": train, "test": validation}))


def test_a_streaming_dataset_is_refused_with_what_to_do(tmp_path):
    stream = datasets.Dataset.from_list(color_rows(2)).to_iterable_dataset()
    with pytest.raises(TypeError, match="needs its length and random access") as err:
        as_dataset(stream)
    assert "without streaming=True" in str(err.value) and "Dataset.from_generator" in str(err.value)
    with pytest.raises(TypeError, match="streaming"):
        run_fit(tmp_path, stream)


def test_layouts_that_cannot_be_read_lazily_are_refused_naming_the_fix():
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    image = Image.new("RGB", (4, 4))
    nested = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": [{"type": "image", "image": image, "text": None}]}]}],
        features=datasets.Features({"messages": datasets.List({"role": datasets.Value("string"), "content": (
            datasets.List({"type": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string")})
        )})}),
    )  # fmt: skip
    cases = {
        "images nested in the messages": (nested, "put the images in an 'images' column"),
        "images under another name": (
            datasets.Dataset.from_list([{"conversations": turns, "picture": image}]),
            "dataset.rename_column('picture', 'image')",
        ),
        "an image column of numbers": (datasets.Dataset.from_list([{"conversations": turns, "image": 3}]), "int64"),
        "a VQA dataset": (datasets.Dataset.from_list([{"question": "q", "answers": ["a"]}]), "to_llava_json"),
        "a transform": (
            datasets.Dataset.from_list([{"conversations": turns}]).with_transform(lambda batch: batch),
            "dataset.map",
        ),
    }
    for what, (ds, fix) in cases.items():
        with pytest.raises(ValueError) as err:
            as_dataset(ds)
        assert fix in str(err.value), f"{what}: the error should say {fix!r}: {err.value}"


def test_resume_continues_on_the_same_hf_dataset_and_refuses_a_changed_one(tmp_path):
    rows = color_rows(8)
    settings = dict(shuffle=True, lora_dropout=0.0)
    run_fit(tmp_path / "whole", datasets.Dataset.from_list(rows), max_steps=4, **settings)
    run_fit(tmp_path, datasets.Dataset.from_list(rows), **settings)
    same = datasets.Dataset.from_list([dict(r) for r in rows])  # another object, the same data
    loop = run_fit(tmp_path, same, max_steps=4, resume_from="latest", **settings)
    assert loop.resumed_from is not None and loop.state.step == 4, "the same HF dataset should resume"
    losses = [[r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
              for out in (tmp_path / "whole", tmp_path)]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), f"resumed losses differ from one run's: {losses}"
    edited = [dict(r) for r in rows]
    edited[5] = {**rows[5], "conversations": [rows[5]["conversations"][0], {"from": "gpt", "value": "purple"}]}
    with pytest.raises(ValueError, match=r"training data: 8 records \(fingerprint\(\) .*resume_with_new_data"):
        run_fit(tmp_path, datasets.Dataset.from_list(edited), max_steps=6, resume_from="latest", **settings)


def test_other_inputs_never_import_datasets():
    script = (
        "import sys\nfrom llava_loop import Loop\nfrom llava_loop.data import as_dataset\n"
        "as_dataset([{'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Yo'}]}])\n"
        "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------- VQA / caption datasets -> LLaVA JSON
def vqa_dataset() -> datasets.Dataset:
    """VQAv2-style rows: answers as dicts with "answer", JPEG bytes; questions 0 and 1 share an image."""
    red, blue = jpeg(COLORS["red"]), jpeg(COLORS["blue"])
    answers = [
        ["red", "Red", "red ", "pink", "red", "red", "crimson", "red", "red", "maroon"],
        ["yes", "no", "yes"],
        ["two", "2", "3", "2 ", "three"],
    ]
    return datasets.Dataset.from_dict(
        {
            "question_id": [101, 102, 103],
            "question": ["What colour is it?", "Is it square?", "How many?"],
            "answers": [[{"answer": a, "answer_id": k} for k, a in enumerate(group)] for group in answers],
            "image": [{"bytes": red, "path": "a.jpg"}, {"bytes": red, "path": "a.jpg"}, {"bytes": blue, "path": None}],
        }
    ).cast_column("image", datasets.Image())


def test_vqa_conversion_writes_llava_json_that_loads_trains_and_scores(tmp_path):
    ds = vqa_dataset()
    paths = to_llava_json(datasets.DatasetDict({"train": ds, "validation": ds}), tmp_path / "out")
    assert set(paths) == {"train", "validation"}, paths
    records = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [r["id"] for r in records] == ["101", "102", "103"], "ids should come from question_id"
    assert [r["conversations"][1]["value"] for r in records] == ["red", "yes", "2"], (
        "the target should be the most frequent answer after VQA normalisation ('two' and '2' count together)"
    )
    assert records[0]["conversations"][0]["value"] == VQA_PROMPT.replace("{question}", "What colour is it?")
    assert records[2]["answers"] == ["two", "2", "3", "2 ", "three"], "the references should be every answer as given"
    images = sorted((tmp_path / "out" / "images").iterdir())
    assert len(images) == 2 and records[0]["image"] == records[1]["image"], "a shared image should be written once"
    written = (tmp_path / "out" / records[2]["image"]).read_bytes()
    assert written == jpeg(COLORS["blue"]) and records[2]["image"].endswith(".jpg"), "the JPEG was not copied as is"
    train, val = load_llava_json(paths["train"]), load_llava_json(paths["validation"])
    assert train[2]["image"].getpixel((8, 8))[2] > 150, "the record does not point at its own (blue) image"
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, small_config(tmp_path / "run", max_steps=2, max_new_tokens=2), metrics="vqa_accuracy")
    loop.fit(train)
    result = loop.evaluate(val)
    assert loop.state.step == 2 and 0.0 <= result["eval/vqa_accuracy"] <= 1.0, f"no VQA accuracy: {dict(result)}"
    assert [r["references"] for r in result.samples] == [r["answers"] for r in records], "references were changed"


def test_synthetic_okvqa_has_okvqa_columns_and_targets_that_need_the_image(tmp_path):
    ds = synthetic_okvqa(30, seed=3)
    assert ds.column_names == ["question_id", "question", "answers", "image"], ds.column_names
    assert ds.features["image"] == datasets.Image() and ds.features["question_id"] == datasets.Value("int64"), (
        f"not OK-VQA's column types: {ds.features}"
    )
    assert synthetic_okvqa(30, seed=3)[:]["answers"] == ds[:]["answers"], "the same seed gave other rows"
    assert not set(synthetic_okvqa(5, seed=4)["question_id"]) & set(ds["question_id"]), "ids repeat across seeds"
    records = json.loads(Path(to_llava_json(ds, tmp_path / "out", id_column="question_id")["data"]).read_text())
    targets_per_question = {}
    for row, record in zip(ds, records):
        votes, target = [_vqa_normalize(a) for a in row["answers"]], _vqa_normalize(_answer(record))
        assert len(votes) == 10, f"{row['question_id']}: not ten annotator answers"
        assert votes.count(target) >= 6, f"{row['question_id']}: the target {target!r} is not the clear majority"
        targets_per_question.setdefault(row["question"], set()).add(target)
        if row["question"].startswith("What color"):
            assert DRAWN_COLORS[target] in set(row["image"].getdata()), f"{row['question_id']}: no {target} shape drawn"
        elif row["question"].startswith("Is it on the left"):
            columns = range(0, 16) if target == "left" else range(16, 32)
            drawn = {row["image"].getpixel((x, y)) for x in columns for y in range(32)}
            assert drawn != {(128, 128, 128)}, f"{row['question_id']}: nothing is drawn on the {target}"
    assert all(len(targets) > 1 for targets in targets_per_question.values()), (
        f"a question has the same answer whatever the image: {targets_per_question}"
    )


def test_caption_conversion_gives_one_record_per_image_or_per_caption(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": jpeg(COLORS["red"]), "path": None}, {"bytes": jpeg(COLORS["blue"]), "path": None}],
         "sentences": [[{"raw": "A red square.", "tokens": []}, {"raw": "Red.", "tokens": []}],
                       [{"raw": "Blue.", "tokens": []}]]}
    ).cast_column("image", datasets.Image())  # fmt: skip
    per_image = json.loads(open(to_llava_json(ds, tmp_path / "a")["data"]).read())
    assert [(r["id"], r["conversations"][1]["value"], r["answers"]) for r in per_image] == [
        ("data-0", "A red square.", ["A red square.", "Red."]),
        ("data-1", "Blue.", ["Blue."]),
    ], per_image
    per_caption = json.loads(open(to_llava_json(ds, tmp_path / "b", one_record_per="caption")["data"]).read())
    assert [(r["id"], r["conversations"][1]["value"]) for r in per_caption] == [
        ("data-0-0", "A red square."), ("data-0-1", "Red."), ("data-1-0", "Blue."),
    ], per_caption  # fmt: skip
    assert (
        per_caption[0]["image"] == per_caption[1]["image"] and len(load_llava_json(tmp_path / "b" / "data.json")) == 3
    )


def test_conversion_columns_are_found_by_name_or_the_error_lists_the_columns(tmp_path):
    image = {"bytes": jpeg(COLORS["red"]), "path": None}

    def dataset(**columns):
        return datasets.Dataset.from_dict({k: [v] for k, v in columns.items()}).cast_column("img", datasets.Image())

    cases = {
        "no task columns": (
            dataset(img=image, label="x"),
            {},
            ["found neither a question column", "columns: img, label"],
        ),
        "answers missing": (dataset(img=image, question="q"), {}, ["no answers column", "columns: img, question"]),
        "two answer columns": (
            dataset(img=image, question="q", answers=["a"], answer="a"),
            {},
            ["(answers, answer); pass answers_column"],
        ),
        "a typo": (
            dataset(img=image, caption="c"),
            {"caption_column": "captoin"},
            ["'captoin' is not a column", "img"],
        ),
        "no {question}": (dataset(img=image, question="q", answers=["a"]), {"prompt": "<image>\nSay"}, ["{question}"]),
        "no <image>": (dataset(img=image, caption="c"), {"prompt": "Describe it."}, ["one <image> marker"]),
    }
    for what, (ds, options, messages) in cases.items():
        with pytest.raises(ValueError) as err:
            to_llava_json(ds, tmp_path / what, **options)
        assert all(m in str(err.value) for m in messages), f"{what}: expected {messages} in {err.value}"
        assert not (tmp_path / what).exists(), f"{what}: something was written before the error"
    repeated = dataset(img=image, question="q", answers=["a"], id="x")
    with pytest.raises(ValueError, match="ids in column 'id' repeat"):
        to_llava_json(datasets.concatenate_datasets([repeated, repeated]), tmp_path / "ids")
    records = json.loads(open(to_llava_json(dataset(img=image, caption="c", id=7), tmp_path / "ok")["data"]).read())
    assert records[0]["id"] == "7" and records[0]["conversations"][1]["value"] == "c", records


def test_conversion_skips_bad_rows_and_counts_them_or_raises(tmp_path, caplog):
    ds = vqa_dataset()
    broken = ds.cast_column("image", datasets.Image(decode=False))
    broken = datasets.Dataset.from_dict({**broken.to_dict(), "question": ["What colour is it?", " ", "How many?"]})
    broken = broken.cast_column("image", datasets.Image())
    with pytest.raises(BadSampleError, match=r"bad sample '102' \(HF dataset 'data'\): column 'question' holds no"):
        to_llava_json(broken, tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        records = json.loads(open(to_llava_json(broken, tmp_path / "b", on_bad_sample="skip")["data"]).read())
    assert [r["id"] for r in records] == ["101", "103"], records
    assert any("skipped 1 of 3 rows" in r.getMessage() for r in caplog.records), "the skip is not counted"


def test_convert_cli_runs_offline_on_a_saved_dataset_and_a_parquet_file(tmp_path, capsys):
    ds = vqa_dataset()
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(tmp_path / "saved")
    ds.to_parquet(tmp_path / "okvqa_val.parquet")
    assert main(["convert", str(tmp_path / "saved"), str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert len(load_llava_json(tmp_path / "a" / "train.json")) == 3
    assert len(load_llava_json(tmp_path / "a" / "validation.json")) == 1
    argv = ["convert", str(tmp_path / "okvqa_val.parquet"), str(tmp_path / "b"), "--split", "validation",
            "--id_column", "", "--prompt", r"<image>\nQ: {question}\nA:"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    records = json.loads((tmp_path / "b" / "validation.json").read_text())
    assert records[0]["id"] == "validation-0" and records[0]["conversations"][0]["value"] == (
        "<image>\nQ: What colour is it?\nA:"
    ), records[0]
    folder = tmp_path / "csv"
    (folder / "pics").mkdir(parents=True)
    (folder / "pics" / "a.jpg").write_bytes(jpeg(COLORS["green"]))
    (folder / "vqa.csv").write_text("question,answer,image\nWhat colour?,green,pics/a.jpg\n")
    assert main(["convert", str(folder / "vqa.csv"), str(tmp_path / "d")]) == 0, capsys.readouterr().err
    record = load_llava_json(tmp_path / "d" / "train.json")[0]  # paths resolve against the CSV's folder
    assert record["answers"] == ["green"] and record["image"].getpixel((8, 8))[1] > 150, record
    (folder / "vqa.csv").write_text(f"question,answer,image\nWhat colour?,green,{tmp_path / 'saved' / 'x.jpg'}\n")
    capsys.readouterr()
    for argv, message in (
        (["convert", str(tmp_path / "saved"), str(tmp_path / "c"), "--caption_column", "text"], "columns: question_id"),
        (["convert", str(tmp_path / "saved"), str(tmp_path / "a")], "is not empty"),
        (["convert", str(tmp_path / "saved"), str(tmp_path / "c"), "--split", "test"], "no split 'test'"),
        (["convert", "someone/no-such-dataset", str(tmp_path / "c")], "the Hugging Face Hub is off"),
        (["convert", str(folder / "vqa.csv"), str(tmp_path / "c")], "leads outside the image folder"),
    ):
        assert main(argv) == 2, f"{argv} should fail as a user error"
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, f"{argv}: {err}"
        assert not (tmp_path / "c").exists(), f"{argv} wrote output before failing"


def test_convert_without_datasets_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert main(["convert", str(tmp_path / "x.parquet"), str(tmp_path / "out")]) == 2
    assert "pip install 'llava_loop[datasets]'" in capsys.readouterr().err
