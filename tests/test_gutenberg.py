"""The Austen corpus without apt: Project Gutenberg's plain-text ebooks, parsed from files written here in
Gutenberg's format and "downloaded" through file:// URLs; no network is used."""
import subprocess
import sys
import urllib.error

import pytest

from conftest import REPO, import_tool
from deqlab.errors import DatasetError

austen, gutenberg = import_tool("corpora.austen"), import_tool("corpora.gutenberg")


def gutenberg_ebook(title: str, number: int, chapters: list[str]) -> str:
    """An ebook as Gutenberg serves it: BOM, CRLF, licence header, title page, a table of contents, the text
    with an illustration marker, the END line and the licence footer."""
    body = "\n\n".join(f"CHAPTER {roman}\n\n{text}\n\n[Illustration]" for roman, text in
                       zip(("I", "II", "III"), chapters))
    text = (f"The Project Gutenberg eBook of {title}\n\nThis ebook is for the use of anyone anywhere in the United "
            f"States and\nmost other parts of the world at no cost.\n\nTitle: {title}\n\nAuthor: Jane Austen\n\n"
            f"Release date: August 1, 1994 [eBook #{number}]\n\n"
            f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n{title.upper()}\n\nBy Jane Austen\n\n"
            f"CONTENTS\n\n  CHAPTER I\n  CHAPTER II\n\n\nVOLUME I\n\n{body}\n\nFINIS\n\n\n"
            f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\nUpdated editions will replace the "
            f"previous one--the old editions will\nbe renamed.\n")
    return "\ufeff" + text.replace("\n", "\r\n")


EMMA_CHAPTERS = ["Emma Woodhouse, handsome, clever, and rich, with a comfortable home\nand happy disposition.",
                 "Mr. Weston was a native of Highbury, and born of a respectable family."]


def write_mirror(root) -> str:
    """``root/<n>/pg<n>.txt`` for the six novels; returns the base URL (file://)."""
    for name, number in gutenberg.EBOOKS.items():
        chapters = EMMA_CHAPTERS if name == "emma" else [
            f"The {name} story begins here, and it goes on for a while with words.",
            f"It ends in {name} with a marriage, as it should, and nobody is sorry."]
        (root / str(number)).mkdir(parents=True)
        (root / str(number) / f"pg{number}.txt").write_bytes(
            gutenberg_ebook(austen.NOVELS[name], number, chapters).encode("utf-8"))
    return root.as_uri()


def test_ebook_numbers_and_url():
    assert gutenberg.EBOOKS == {"emma": 158, "prideprejudice": 1342, "sensesensibility": 161, "persuasion": 105,
                                "northangerabbey": 121, "mansfieldpark": 141}
    assert set(gutenberg.EBOOKS) == set(austen.NOVELS)
    assert gutenberg.ebook_url(158) == "https://www.gutenberg.org/cache/epub/158/pg158.txt"


def test_header_footer_contents_and_illustrations_are_stripped():
    lines = gutenberg.strip_gutenberg(gutenberg_ebook("Emma", 158, EMMA_CHAPTERS), "pg158.txt")
    assert lines[0] == "VOLUME I"  # from the volume heading above the first chapter with prose
    assert not any("Gutenberg" in line or "Illustration" in line or "CONTENTS" in line for line in lines)
    assert austen.novel_to_lines("emma", lines) == [
        ["=", "Emma", "="], ["=", "=", "Volume", "1", "=", "="], ["=", "=", "Chapter", "1", "=", "="],
        ["Emma", "Woodhouse", ",", "handsome", ",", "clever", ",", "and", "rich", ",", "with", "a", "comfortable",
         "home", "and", "happy", "disposition", "."],
        ["=", "=", "Chapter", "2", "=", "="],
        ["Mr", ".", "Weston", "was", "a", "native", "of", "Highbury", ",", "and", "born", "of", "a", "respectable",
         "family", "."]]


def test_a_file_without_gutenberg_markers_is_refused_in_one_line():
    with pytest.raises(DatasetError, match=r"^notes\.txt is not a Project Gutenberg plain-text ebook") as err:
        gutenberg.strip_gutenberg("CHAPTER I\n\nSome text.\n", "notes.txt")
    assert "\n" not in str(err.value)


def test_apt_failure_falls_back_to_gutenberg(tmp_path):
    base = write_mirror(tmp_path / "mirror")
    logs = []

    def no_apt(folder):
        raise DatasetError("apt-get is not available to download r-cran-janeaustenr")

    novels, source = austen.load_novels(log=logs.append, fetch_deb=no_apt, gutenberg_url=base)
    assert set(novels) == set(austen.NOVELS) and source["gutenberg"] == base
    assert novels["emma"] == gutenberg.strip_gutenberg(
        (tmp_path / "mirror/158/pg158.txt").read_text(encoding="utf-8"), "emma")
    assert "apt-get is not available to download r-cran-janeaustenr; downloading the novels from Project " \
           "Gutenberg instead" in logs
    assert f"downloading {base}/1342/pg1342.txt" in logs


def test_corpus_built_from_gutenberg(tmp_path, capsys):
    make_austen_corpus = import_tool("make_austen_corpus")
    base = write_mirror(tmp_path / "mirror")
    stats = make_austen_corpus.main(["--gutenberg", "--gutenberg-url", base, "--out", str(tmp_path / "austen"),
                                     "--min-count", "2"])
    assert stats["source"]["gutenberg"] == base and stats["source"]["ebooks"]["emma"] == 158
    train = (tmp_path / "austen/train.txt").read_text()
    # words seen once in train are <unk> (--min-count 2)
    assert train.startswith(" = Emma = \n = = Volume 1 = = \n = = Chapter 1 = = \n Emma <unk> , <unk> , ")
    assert "Gutenberg" not in train and "FINIS" not in train
    assert "Project Gutenberg's ebooks" in (tmp_path / "austen/README.md").read_text()


def test_failed_download_is_one_line_naming_the_url():
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    def no_apt(folder):
        raise DatasetError("apt-get is not available to download r-cran-janeaustenr")

    with pytest.raises(DatasetError) as err:
        austen.load_novels(log=lambda msg: None, fetch_deb=no_apt, opener=offline)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot get the novels (apt-get: apt-get is not available to download "
                              "r-cran-janeaustenr; Project Gutenberg: cannot download "
                              "https://www.gutenberg.org/cache/epub/158/pg158.txt (Temporary failure in name "
                              "resolution))")
    assert "--gutenberg-url" in message  # what to do instead


def test_tool_says_so_in_one_line_when_the_download_fails(tmp_path):
    missing = (tmp_path / "no-mirror").as_uri()
    run = subprocess.run([sys.executable, str(REPO / "tools/make_austen_corpus.py"), "--gutenberg",
                          "--gutenberg-url", missing, "--out", str(tmp_path / "austen")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot download {missing}/158/pg158.txt" in errors[0], run.stderr
    assert not (tmp_path / "austen").exists()
