"""Language-model data: vocabulary, encoding and batching against the original locuslab/deq code's outputs;
the cache; errors; the Jane Austen corpus builder (tokenisation, layout, R lazy-load reading, CLI)."""
import gzip
import io
import json
import math
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COMPAT, REPO, import_tool, needs_compat
from deqlab.data import lm
from deqlab.data.lm import LMOrderedIterator, batchify, load_corpus, shard_streams, unigram_perplexity
from deqlab.errors import DatasetError

pytestmark = pytest.mark.timeout(60)
austen = import_tool("corpora.austen")
DT = COMPAT / "deq_transformer"


@pytest.fixture
def reference():
    return torch.load(DT / "corpus_reference.pt", weights_only=True)


@needs_compat
def test_vocab_and_splits_match_the_original_corpus(reference, tmp_path):
    corpus = load_corpus(DT / "corpus", cache_dir=tmp_path)
    assert corpus.vocab.idx2sym == reference["idx2sym"]
    assert len(corpus.vocab) == 1680 and corpus.vocab.eos_idx == 0
    for split in lm.SPLITS:
        got = corpus.split(split)
        assert got.dtype == torch.int64 and torch.equal(got, reference[split]), split


@needs_compat
def test_batching_matches_the_original_iterator(tmp_path):
    ref = torch.load(DT / "small_reference_outputs.pt", weights_only=True)
    corpus = load_corpus(DT / "corpus", cache_dir=tmp_path)
    it = corpus.get_iterator("valid", 3, 12)
    assert torch.equal(it.data, ref["valid_batched_bsz3"])
    segments = list(it)
    assert len(segments) == len(it) == math.ceil((it.n_step - 1) / 12)
    (d1, t1, n1), (d2, t2, n2) = segments[:2]
    assert n1 == n2 == 12
    for got, key in ((d1, "data_seg1"), (t1, "target_seg1"), (d2, "data_seg2"), (t2, "target_seg2")):
        assert torch.equal(got, ref[key]), key
    assert segments[-1][2] == (it.n_step - 1) - 12 * (len(it) - 1)  # the short last segment
    # a second epoch starts over from row 0
    assert torch.equal(next(iter(it))[0], ref["data_seg1"])
    assert torch.equal(next(it.iter_from(1))[0], ref["data_seg2"])


def test_ordered_iterator_layout_and_ext_len():
    data = torch.arange(23)
    it = LMOrderedIterator(data, bsz=2, tgt_len=4, ext_len=2)
    assert it.data.shape == (11, 2)  # 23 trimmed to 22; column j is data[11*j : 11*(j+1)]
    assert torch.equal(it.data[:, 1], torch.arange(11, 22))
    segs = list(it)
    assert [s[2] for s in segs] == [4, 4, 2] and len(it) == 3
    data0, target0, _ = segs[0]
    assert torch.equal(data0[:, 0], torch.arange(0, 4)) and torch.equal(target0[:, 0], torch.arange(1, 5))
    data1, target1, _ = segs[1]  # two extra context rows before the segment
    assert torch.equal(data1[:, 0], torch.arange(2, 8)) and torch.equal(target1[:, 0], torch.arange(5, 9))
    assert torch.equal(segs[2][1][:, 1], torch.tensor([20, 21]))
    with pytest.raises(DatasetError):
        batchify(torch.arange(3), 2)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_concatenate_to_the_single_process_batch(world):
    data = torch.randint(0, 50, (1000,))
    single = LMOrderedIterator(data, 6, 7, ext_len=3)
    ranks = [LMOrderedIterator(data, 6, 7, ext_len=3, rank=r, world_size=world) for r in range(world)]
    assert all(len(r) == len(single) and r.local_bsz == 6 // world for r in ranks)
    for segment, *shards in zip(single, *ranks):
        assert torch.equal(torch.cat([s[0] for s in shards], 1), segment[0])
        assert torch.equal(torch.cat([s[1] for s in shards], 1), segment[1])
    batched = batchify(data, 6)
    assert torch.equal(shard_streams(batched, 1, 2), batched[:, 3:6])
    with pytest.raises(ValueError, match="divisible"):
        shard_streams(batched, 0, 4)


def _write_corpus(root: Path, train: str, valid: str, test: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def test_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    root = _write_corpus(tmp_path / "c", " b a b \n c a b \n", " a b \n", " c \n")
    first = load_corpus(root)
    assert not first.from_cache and first.vocab.idx2sym == ["<eos>", "b", "a", "c"]
    cache = root / lm.CACHE_NAME
    blob = torch.load(cache, weights_only=True)  # tensors, strings, a list of strings: no pickled objects
    assert blob["idx2sym"] == first.vocab.idx2sym and torch.equal(blob["train"], first.train)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the text was re-read although the cache is valid")
    monkeypatch.setattr(lm, "count_file", no_rebuild)
    second = load_corpus(root)
    assert second.from_cache and second.vocab.idx2sym == first.vocab.idx2sym
    assert all(torch.equal(second.split(s), first.split(s)) for s in lm.SPLITS)
    monkeypatch.undo()

    (root / "valid.txt").write_text(" a b \n b b c \n", encoding="utf-8")  # edited text -> cache stale
    third = load_corpus(root)
    assert not third.from_cache and third.valid.tolist() == [2, 1, 0, 1, 1, 3, 0]
    assert load_corpus(root).from_cache
    cache.write_bytes(b"not a torch file")  # a damaged cache is rebuilt, with a warning
    with pytest.warns(UserWarning, match="unreadable corpus cache"):
        assert not load_corpus(root).from_cache
    other = load_corpus(root, cache_dir=tmp_path / "cache")  # cache elsewhere, named by the root
    assert lm.cache_path(root, tmp_path / "cache").is_file() and other.vocab.idx2sym == first.vocab.idx2sym


def test_missing_corpus_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match="wikitext-103-v1.zip") as err:
        load_corpus(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "\n" not in str(err.value)
    root = tmp_path / "wt"
    root.mkdir()
    (root / "valid.txt").write_text(" a \n")
    (root / "test.txt").write_text(" a \n")
    with pytest.raises(DatasetError, match=r"rename wiki\.\{train,valid,test\}\.tokens") as err:
        load_corpus(root)
    assert str(root / "train.txt") in str(err.value) and "found wiki" not in str(err.value)
    (root / "wiki.train.tokens").write_text(" a \n")
    with pytest.raises(DatasetError, match=r"found wiki\.\*\.tokens there"):
        load_corpus(root)


def test_oov_token_without_unk_names_token_file_and_line(tmp_path):
    root = _write_corpus(tmp_path / "c", " a b \n b \n", " a \n b zebra a \n", " a \n")
    with pytest.raises(DatasetError) as err:
        load_corpus(root, cache=False)
    msg = str(err.value)
    assert "'zebra'" in msg and f"{root / 'valid.txt'}:2" in msg and "\n" not in msg
    # with <unk> in the vocabulary, an unknown token maps to it
    root = _write_corpus(tmp_path / "u", " a <unk> b \n", " a zebra \n", " a \n")
    corpus = load_corpus(root, cache=False)
    assert corpus.vocab.decode(corpus.valid) == "a <unk> <eos>"


def test_unigram_perplexity_by_hand():
    train, split = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 3])
    # add-one: p(1) = (2 + 1) / (4 + 4), p(3) = (0 + 1) / (4 + 4)
    expected = math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert unigram_perplexity(train, split, 4) == pytest.approx(expected, rel=1e-12)
    assert unigram_perplexity(train, torch.tensor([1, 1]), 4) == pytest.approx(8 / 3)


# --- Jane Austen corpus -------------------------------------------------------------------------------

def test_tokenize_real_sentences():
    tok = lm.tokenize
    assert tok('"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield '
               'Park is let at last?"') == [
        '"', "My", "dear", "Mr", ".", "Bennet", ",", '"', "said", "his", "lady", "to", "him", "one", "day", ",",
        '"', "have", "you", "heard", "that", "Netherfield", "Park", "is", "let", "at", "last", "?", '"']
    assert tok('"I hope not _that_.--It is not likely. No, Mr. Knightley, do not foretell vexation."') == [
        '"', "I", "hope", "not", "that", ".", "--", "It", "is", "not", "likely", ".", "No", ",", "Mr", ".",
        "Knightley", ",", "do", "not", "foretell", "vexation", ".", '"']
    assert tok("\"Think of me to-morrow, my dear Emma, about four o'clock,\" was Mrs. Weston's parting "
               "injunction") == [
        '"', "Think", "of", "me", "to", "@-@", "morrow", ",", "my", "dear", "Emma", ",", "about", "four",
        "o'clock", ",", '"', "was", "Mrs", ".", "Weston", "'s", "parting", "injunction"]
    assert tok("\"Ah! poor Miss Taylor! 'Tis a sad business. I don't know, ma'am; her £20,000, &c.\"") == [
        '"', "Ah", "!", "poor", "Miss", "Taylor", "!", "'", "Tis", "a", "sad", "business", ".", "I", "do", "n't",
        "know", ",", "ma'am", ";", "her", "£", "20", "@,@", "000", ",", "&c", ".", '"']
    assert tok("the Miss Musgroves' walk ----shire") == ["the", "Miss", "Musgroves", "'", "walk", "--", "shire"]


def test_novel_layout_headings_and_dropped_matter():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER XIV", "",
             "Emma Woodhouse, handsome, clever,", "  and rich.", "", "", "* * * * *", "",
             "[At this point in the first and second editions, Volume 1 ends.]", "",
             "    [To Mrs. Weston.]", "", "Chapter 2", "Yes.", "", "THE END"]
    assert austen.novel_to_lines("emma", lines) == [
        ["=", "Emma", "="], ["=", "=", "Volume", "1", "=", "="], ["=", "=", "Chapter", "14", "=", "="],
        ["Emma", "Woodhouse", ",", "handsome", ",", "clever", ",", "and", "rich", "."],
        ["[", "To", "Mrs", ".", "Weston", ".", "]"], ["=", "=", "Chapter", "2", "=", "="], ["Yes", "."]]
    assert austen.novel_to_lines("northangerabbey", ["CHAPTER 1", "Text.", "", "A NOTE ON THE TEXT", "",
                                                     "Editorial."])[1:] == [
        ["=", "=", "Chapter", "1", "=", "="], ["Text", "."]]
    assert austen.format_line(["a", ",", "b"]) == " a , b \n"


def test_close_vocabulary():
    splits = {"train": [["a", "b", "a"], ["c", "a", "b"]], "valid": [["a", "d", "c"]], "test": [["b"]]}
    closed, kept = austen.close_vocabulary(splits, min_count=2)
    assert kept == {"a", "b"}
    assert closed == {"train": [["a", "b", "a"], ["<unk>", "a", "b"]], "valid": [["a", "<unk>", "<unk>"]],
                      "test": [["b"]]}


def _serialize_r(obj) -> bytes:
    import rdata
    import rdata.unparser
    r_data = rdata.conversion.convert_python_to_r_data(obj, format_version=3)
    return rdata.unparser.unparse_data(r_data, file_format="xdr", file_type="rds")


def _write_lazyload(folder: Path, objects: dict[str, list[str]]) -> Path:
    """An R lazy-load database as R's makeLazyLoadDB writes one: ``Rdata.rdb`` holds each object as a 4-byte
    big-endian length + zlib stream of its serialization; ``Rdata.rdx`` is the gzip-compressed index."""
    folder.mkdir(parents=True, exist_ok=True)
    rdb, variables = b"", {}
    for name, lines in objects.items():
        payload = _serialize_r(np.array(lines, dtype=object))
        blob = len(payload).to_bytes(4, "big") + zlib.compress(payload)
        variables[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    (folder / "Rdata.rdb").write_bytes(rdb)
    index = {"variables": variables, "references": {}, "compressed": np.array([True])}
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_serialize_r(index)))
    return folder


TINY_NOVELS = {name: [title.upper(), "", "by Jane Austen", "", "CHAPTER I", "",
                      f"It was a fine day at {title}, and Anne's walk was long.", "",
                      '"I don\'t know," said she, "it was a fine day."', "", "CHAPTER II", "",
                      f"The {name} end came; it was a fine day.", "", "THE END"]
               for name, title in austen.NOVELS.items()}


def test_make_austen_corpus_from_a_synthetic_lazyload_db(tmp_path, capsys):
    make_austen_corpus = import_tool("make_austen_corpus")
    rdata_dir = _write_lazyload(tmp_path / "janeaustenr" / "data", TINY_NOVELS)
    assert austen.read_rdata_dir(tmp_path / "janeaustenr") == TINY_NOVELS
    out = tmp_path / "austen"
    stats = make_austen_corpus.main(["--rdata-dir", str(rdata_dir), "--out", str(out), "--min-count", "4"])
    assert "[austen] vocabulary" in capsys.readouterr().out
    train = (out / "train.txt").read_text().splitlines()
    assert all(line.startswith(" ") and line.endswith(" ") and line.strip() for line in train)
    # words of every novel (4 times in train) stay; a title's words (twice) and the novel's name (once) do not
    assert train[:4] == [" = <unk> = ", " = = Chapter 1 = = ", " It was a fine day at <unk> , and Anne 's walk was long . ",
                         ' " I do n\'t know , " said she , " it was a fine day . " ']
    assert len(train) == 4 * 6
    valid = (out / "valid.txt").read_text().splitlines()
    assert valid[0] == " = <unk> <unk> = " and valid[-1] == " The <unk> end came ; it was a fine day . "
    corpus = load_corpus(out)  # closed vocabulary: valid/test have no out-of-vocabulary token
    assert "<unk>" in corpus.vocab.idx2sym and json.loads((out / "stats.json").read_text()) == stats
    assert stats["splits"]["valid"]["lines"] == 6 and stats["vocab_size"] == len(corpus.vocab)
    with pytest.raises(DatasetError, match="--force"):
        make_austen_corpus.main(["--rdata-dir", str(rdata_dir), "--out", str(out)])
    before = (out / "train.txt").read_text()
    with pytest.raises(DatasetError, match="no <unk>"):  # valid/test words unseen in train: not encodable
        make_austen_corpus.main(["--rdata-dir", str(rdata_dir), "--out", str(out), "--min-count", "1", "--force"])
    assert (out / "train.txt").read_text() == before
    make_austen_corpus.main(["--rdata-dir", str(rdata_dir), "--out", str(out), "--min-count", "2", "--force"])
    assert (out / "train.txt").read_text().splitlines()[2] == " It was a fine day at Emma , and Anne 's walk was long . "
    assert json.loads((out / "stats.json").read_text())["min_count"] == 2


def test_read_deb_in_python(tmp_path):
    """A .deb is an ar archive holding data.tar.xz; the Rdata files are read straight from it."""
    folder = _write_lazyload(tmp_path / "db", {"emma": ["EMMA", "", "Text."], "other": ["x"]})
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name in ("Rdata.rdx", "Rdata.rdb"):
            tar.add(folder / name, arcname=f"./{austen.RDATA_SUBDIR}/{name}")
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", tar_bytes.getvalue())]
    deb = b"!<arch>\n" + b"".join(
        f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
        for name, data in members)
    (tmp_path / "x.deb").write_bytes(deb)
    assert austen.read_deb(tmp_path / "x.deb") == {"emma": ["EMMA", "", "Text."], "other": ["x"]}


REAL_DEBS = sorted((REPO / "data").glob("r-cran-janeaustenr_*.deb"))
CAN_DOWNLOAD = shutil.which("apt-get") is not None


@pytest.mark.skipif(not REAL_DEBS and not CAN_DOWNLOAD and os.environ.get("CI") != "true",
                    reason="no data/r-cran-janeaustenr_*.deb and no apt-get to download it; the synthetic tests ran")
def test_real_janeaustenr_deb(tmp_path):
    """The real Debian package: a .deb under data/, else `apt-get download` (as the corpus tool does)."""
    deb = REAL_DEBS[-1] if REAL_DEBS else austen.download_deb(tmp_path)
    novels, source = austen.load_novels(deb=deb, log=lambda msg: None)
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                              "sensesensibility"]
    if source["deb"] != "r-cran-janeaustenr_1.0.0-1_all.deb":  # another release: the numbers below are 1.0.0-1's
        assert all(len(lines) > 5000 for lines in novels.values())
        return
    assert {n: len(v) for n, v in novels.items()} == {
        "emma": 16235, "mansfieldpark": 15349, "northangerabbey": 7856, "persuasion": 8328,
        "prideprejudice": 13030, "sensesensibility": 12624}
    stats = austen.build_corpus(novels, tmp_path, source=source, log=lambda msg: None)
    assert stats["vocab_size"] == 6977
    assert {s: v["tokens_with_eos"] for s, v in stats["splits"].items()} == {
        "train": 681345, "valid": 93392, "test": 99646}
    assert (tmp_path / "valid.txt").read_text().count(" = = Chapter ") == 31
