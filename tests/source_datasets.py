"""Small datasets in every input format, made from the speech fixtures by the real libraries.

``build(root)`` writes, from ``tests/data/audio/clip-XX.flac`` and their sentences in
``speech.jsonl`` (clip i says ``TEXTS[i]``):

| path | what |
|---|---|
| ``hub/data/{train-0000X-of-00002,test-00000-of-00001}.parquet`` | ASR pairs (id, audio, text), ``datasets`` with its Audio feature; train = clips 0-8 (bytes inside), test = 9-11 (paths relative to ``hub/``) |
| ``damaged_parquet/codecs.parquet`` | pairs whose audio bytes are flac, wav, ogg, mp3, then undecodable bytes |
| ``damaged_parquet/truncated.parquet`` | the first half of a parquet file |
| ``arrays.parquet`` | pairs whose audio is ``{"array", "sampling_rate"}`` (clips 0-1, at 16 and 8 kHz) |
| ``messages.parquet`` | a ``messages`` column (audio items without a path) + an ``audio`` list column |
| ``saved/`` | a DatasetDict from ``save_to_disk``: train = clips 12-15, test = 16-17 |
| ``saved_cut/`` | a saved Dataset (clips 12-15, one Arrow file each); the first file lost its last quarter |
| ``rowgroups.parquet`` | clips 0-5 in row groups of 2 (pyarrow), the second group's page header overwritten |
| ``wds/shard-00000{0,1}.tar`` | WebDataset shards (``.flac`` + ``.json``), clips 18-23 |
| ``wds_bad/shard-000000.tar`` | clips 0-3; clip 1's flac is garbage, clip 2's json is malformed |
| ``wds_bad/shard-000001.tar`` | clips 4-6, cut in the middle of clip 5's audio |
| ``jsonl/{a,b}/part.jsonl`` | conversations (absolute audio paths) of clips 0-2 and 3-5, for globs |
| ``long/long.jsonl`` | one conversation over ``long.flac``: all 24 clips joined by 0.5 s of silence (~69 s) |
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf

DATA = Path(__file__).resolve().parent / "data"
CLIPS = sorted((DATA / "audio").glob("clip-*.flac"))
TEXTS = [json.loads(line)["conversations"][1]["content"][0]["text"]
         for line in (DATA / "speech.jsonl").read_text().splitlines()[: len(CLIPS)]]
GAP_S = 0.5


def encode(clip: Path, fmt: str) -> bytes:
    data, rate = sf.read(str(clip), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt)
    return buf.getvalue()


def _pairs(indices: list[int], embed: bool = True):
    """Pairs with the audio bytes inside (what the Hub serves), or ``embed=False``: paths relative to
    the dataset folder (``audio/clip-XX.flac``)."""
    from datasets import Audio, Dataset

    audio = [{"bytes": CLIPS[i].read_bytes() if embed else None, "path": CLIPS[i].name if embed else
              f"audio/{CLIPS[i].name}"} for i in indices]
    ds = Dataset.from_dict({"id": [f"clip-{i:02d}" for i in indices], "audio": audio,
                            "text": [TEXTS[i] for i in indices]})
    # the Audio feature's path form is the same {bytes: null, path} struct; casting would make
    # datasets look for the relative path from the current directory
    return ds.cast_column("audio", Audio()) if embed else ds


def build(root: Path) -> Path:
    from datasets import Audio, Dataset, DatasetDict

    root.mkdir(parents=True, exist_ok=True)
    hub = root / "hub" / "data"
    hub.mkdir(parents=True)
    _pairs(list(range(0, 5))).to_parquet(str(hub / "train-00000-of-00002.parquet"))
    _pairs(list(range(5, 9))).to_parquet(str(hub / "train-00001-of-00002.parquet"))
    _pairs(list(range(9, 12)), embed=False).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    (root / "hub" / "audio").symlink_to(DATA / "audio")

    damaged = root / "damaged_parquet"
    damaged.mkdir()
    audio = [{"bytes": encode(CLIPS[i], fmt), "path": f"clip-{i:02d}.{fmt.lower()}"}
             for i, fmt in enumerate(("FLAC", "WAV", "OGG", "MP3"))]
    audio.append({"bytes": b"this is not audio " * 64, "path": "garbage.flac"})
    Dataset.from_dict({"id": [f"codec-{i}" for i in range(5)], "audio": audio,
                       "text": [*TEXTS[:4], "nothing"]}).cast_column("audio", Audio()).to_parquet(
        str(damaged / "codecs.parquet"))
    whole = root / "whole.parquet"
    _pairs([6, 7, 8]).to_parquet(str(whole))
    blob = whole.read_bytes()
    (damaged / "truncated.parquet").write_bytes(blob[: len(blob) // 2])
    whole.unlink()

    arrays = []
    for i, rate in ((0, 16_000), (1, 8_000)):
        import librosa

        data = sf.read(str(CLIPS[i]), dtype="float32")[0]
        arrays.append({"array": librosa.resample(data, orig_sr=16_000, target_sr=rate).tolist(), "sampling_rate": rate})
    Dataset.from_dict({"id": ["array-0", "array-1"], "audio": arrays, "text": TEXTS[:2]}).to_parquet(
        str(root / "arrays.parquet"))

    messages = [{"id": f"msg-{i}", "messages": [
        {"role": "user", "content": [{"type": "audio", "text": None}, {"type": "text", "text": "Transcribe the speech."}]},
        {"role": "assistant", "content": [{"type": "text", "text": TEXTS[i]}]}],
        "audio": [{"bytes": CLIPS[i].read_bytes(), "path": CLIPS[i].name}]} for i in range(3)]
    Dataset.from_list(messages).to_parquet(str(root / "messages.parquet"))

    DatasetDict({"train": _pairs([12, 13, 14, 15]), "test": _pairs([16, 17])}).save_to_disk(str(root / "saved"))
    _pairs([12, 13, 14, 15]).save_to_disk(str(root / "saved_cut"), max_shard_size=1)  # one file per row
    arrow = sorted((root / "saved_cut").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size * 3 // 4])

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"clip-{i:02d}" for i in range(6)], "text": TEXTS[:6],
                      "audio": [{"bytes": CLIPS[i].read_bytes(), "path": CLIPS[i].name} for i in range(6)]})
    pq.write_table(table, root / "rowgroups.parquet", row_group_size=2, compression="none")
    column = pq.ParquetFile(root / "rowgroups.parquet").metadata.row_group(1).column(2)  # audio.bytes
    blob = bytearray((root / "rowgroups.parquet").read_bytes())
    blob[column.data_page_offset : column.data_page_offset + 40] = b"\xff" * 40  # its page header
    (root / "rowgroups.parquet").write_bytes(bytes(blob))

    import webdataset as wds

    (root / "wds").mkdir()
    for shard, indices in ((0, [18, 19, 20]), (1, [21, 22, 23])):
        with wds.TarWriter(str(root / "wds" / f"shard-{shard:06d}.tar")) as sink:
            for i in indices:
                sink.write({"__key__": f"clip-{i:02d}", "flac": CLIPS[i].read_bytes(), "json": {"text": TEXTS[i]}})
    bad = root / "wds_bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "shard-000000.tar")) as sink:
        for i in range(4):
            sample = {"__key__": f"clip-{i:02d}", "flac": CLIPS[i].read_bytes(), "json": {"text": TEXTS[i]}}
            if i == 1:
                sample["flac"] = b"\x00garbage" * 100
            if i == 2:
                sample["json"] = b'{"text": "cut'
            sink.write(sample)
    with wds.TarWriter(str(root / "cut.tar")) as sink:
        for i in (4, 5, 6):
            sink.write({"__key__": f"clip-{i:02d}", "flac": CLIPS[i].read_bytes(), "json": {"text": TEXTS[i]}})
    import tarfile

    with tarfile.open(root / "cut.tar") as tf:
        cut = tf.getmember("clip-05.flac").offset_data + 1000  # inside clip 5's flac data
    (bad / "shard-000001.tar").write_bytes((root / "cut.tar").read_bytes()[:cut])
    (root / "cut.tar").unlink()

    for name, indices in (("a", range(0, 3)), ("b", range(3, 6))):
        (root / "jsonl" / name).mkdir(parents=True)
        lines = [json.dumps({"id": f"clip-{i:02d}", "conversations": [
            {"role": "user", "content": [{"type": "audio", "audio": str(CLIPS[i])}, {"type": "text", "text": "Transcribe."}]},
            {"role": "assistant", "content": TEXTS[i]}]}) for i in indices]
        (root / "jsonl" / name / "part.jsonl").write_text("\n".join(lines) + "\n")

    (root / "long").mkdir()
    pieces = []
    for clip in CLIPS:
        pieces += [sf.read(str(clip), dtype="float32")[0], np.zeros(int(GAP_S * 16_000), np.float32)]
    sf.write(str(root / "long" / "long.flac"), np.concatenate(pieces), 16_000)
    (root / "long" / "long.jsonl").write_text(json.dumps({"id": "long-0", "conversations": [
        {"role": "user", "content": [{"type": "audio", "audio": "long.flac"}, {"type": "text", "text": "Transcribe."}]}]})
        + "\n")
    return root
