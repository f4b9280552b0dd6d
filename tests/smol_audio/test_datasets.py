"""The SmolLM2 target's three kinds of training conversation: spoken, the same words typed, and general
text chat (the audio-vs-text comparison's inputs, docs/audio-vs-text.md). Typed kinds need no espeak-ng."""

from __future__ import annotations

import json

import pytest

from modeling.smol_audio import chat_prompts, prompts
from modeling.smol_audio.dataset import ensure_dataset, items
from pipeline.data.records import read_conversations


def test_typed_records_pair_with_the_spoken_ones_by_id():
    spoken, typed = items("train", 50, 0, "spoken"), items("train", 50, 0, "text")
    assert [(i, p.text) for i, p, _, _ in spoken] == [(i, p.text) for i, p, _, _ in typed]


def test_chat_prompts_are_other_requests_with_disjoint_splits():
    train, held_out = chat_prompts.prompts("train"), chat_prompts.prompts("eval")
    assert train and held_out
    assert not {p.text for p in train} & {p.text for p in held_out}
    spoken = {p.text for p in prompts.all_prompts()}
    assert not spoken & {p.text for p in chat_prompts.all_prompts()}
    assert not {p.id for p in prompts.all_prompts()} & {p.id for p in chat_prompts.all_prompts()}
    kinds = {p.text.split()[0] for p in train[:40]}  # hash order mixes the templates
    assert len(kinds) >= 4, kinds
    with pytest.raises(ValueError, match="chat split"):
        chat_prompts.prompts("target")


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_typed_dataset_is_read_as_text_only_conversations(tmp_path, kind):
    out = ensure_dataset(tmp_path / kind, "train", 7, 0, kind=kind)
    assert json.loads((out / "dataset.json").read_text())["kind"] == kind
    assert not (out / "audio").exists()
    result = read_conversations(out / "data.jsonl", require_assistant=True)
    assert len(result.records) == 7 and not result.rejected
    for rec in result.records:
        assert not rec.audio_paths and rec.turns[0].role == "user" and rec.turns[0].text.strip()
    again = ensure_dataset(tmp_path / kind, "train", 7, 0, kind=kind)  # complete: kept, not rebuilt
    assert again == out and (out / "data.jsonl").stat().st_mtime_ns == (again / "data.jsonl").stat().st_mtime_ns


def test_bad_kind_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        ensure_dataset(tmp_path / "x", "train", 3, 0, kind="video")
    assert not (tmp_path / "x").exists()


def test_joined_draft_split_is_everything_but_the_held_out_prompts():
    joined = prompts.prompts("target+train")
    parts = prompts.prompts("target") + prompts.prompts("train")
    assert sorted(p.id for p in joined) == sorted(p.id for p in parts)  # each prompt once
    assert not {p.text for p in joined} & {p.text for p in prompts.prompts("eval")}
    assert len(joined) + len(prompts.prompts("eval")) == len(prompts.all_prompts())
    assert len({p.text.split()[0] for p in joined[:40]}) >= 4  # hash order: a prefix mixes the templates
    with pytest.raises(ValueError, match="target\\+train"):
        prompts.prompts("eval+train")


def test_added_question_forms_are_new_prompts_and_leave_the_old_splits_alone():
    more, old = prompts.prompts("more"), prompts.all_prompts()
    assert len(more) == len({p.id for p in more}) > len(prompts.prompts("target+train")) // 2
    assert not {p.text for p in more} & {p.text for p in old} and not {p.id for p in more} & {p.id for p in old}
    assert all(prompts.split_of(p) != "eval" for p in more)  # none in the held-out bucket
    assert len(old) == 2026 and len(prompts.prompts("eval")) == 198  # the target's and the benchmark's as built
    assert len({p.text.split()[0] for p in more[:40]}) >= 4  # hash order


def test_pipeline_speaks_the_joined_split_only_for_the_smol_prompts(tmp_path):
    from pipeline.cluster.orchestrate import PipelineConfig
    from pipeline.core.config import ConfigError

    cfg = PipelineConfig(workdir=str(tmp_path), target="t", synth_generator="smol-audio", synth_train_clips=5,
                         synth_train_split="target+train")
    assert cfg.input.endswith("clips-train/data.jsonl")
    for bad in ({"synth_generator": "asr"}, {"synth_generator": "smol-audio", "synth_kind": "chat"}):
        with pytest.raises(ConfigError, match="synth_train_split"):
            PipelineConfig(workdir=str(tmp_path), target="t", synth_train_clips=5, synth_train_split="target+train", **bad)
    with pytest.raises(ConfigError, match="synth_train_split must be"):
        PipelineConfig(workdir=str(tmp_path), target="t", synth_train_clips=5, synth_train_split="eval")


def test_on_topic_rate_counts_every_stage1_line(tmp_path):
    from benchmarks.smol_answers_on_topic import on_topic

    def record(prompt: str, answer: str) -> str:
        return json.dumps({"prompt": prompt, "conversations": [
            {"role": "user", "content": [{"type": "audio", "audio": "a.flac"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})

    (tmp_path / "shard-00000-of-00001.jsonl").write_text("\n".join([
        record("What is a volcano?", "A volcano is a mountain."), record("What is a glacier?", "The sun is hot."),
        '{"id": "x"}']) + "\n")
    got = on_topic(tmp_path)
    assert (got["records"], got["names_topic"]) == (2, 0.5)
    assert len(got["rejected"]) == 1 and "shard-00000-of-00001.jsonl:3" in got["rejected"][0]
