"""LICENSE and CITATION.cff: the citation file parses as YAML and has the fields Citation File Format 1.2.0 requires,
for the software and for each paper it cites, and the papers are the ones the code implements."""
import re

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.xdist_group("citation")  # its module-scoped fixture is built once per worker group

CFF = REPO / "CITATION.cff"
# arXiv ids of the methods the code implements: DEQ, MDEQ, Jacobian regularisation, phantom gradient, Skip DEQ,
# "test like you train"
CITED = {"1909.01377", "2006.08656", "2106.14342", "2111.05177", "2201.12240", "2305.15042"}
REFERENCE_TYPES = {"article", "conference-paper", "software", "report", "thesis", "book", "generic"}


@pytest.fixture(scope="module")
def citation() -> dict:
    return yaml.safe_load(CFF.read_text(encoding="utf-8"))


def check_authors(authors, where: str) -> None:
    assert isinstance(authors, list) and authors, f"{where}: authors must be a non-empty list"
    for person in authors:  # a person (family-names) or an entity (name)
        assert person.get("family-names") or person.get("name"), f"{where}: author without a name: {person}"


def test_citation_has_the_required_cff_fields(citation):
    assert str(citation["cff-version"]) == "1.2.0"
    for key in ("message", "title"):
        assert isinstance(citation[key], str) and citation[key].strip()
    check_authors(citation["authors"], "CITATION.cff")
    assert citation["type"] == "software" and citation["license"] == "MIT"
    assert str(citation["version"]) == re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)


def test_every_reference_is_complete_and_the_cited_papers_are_there(citation):
    ids = set()
    for ref in citation["references"]:
        where = f"reference {ref.get('title')!r}"
        assert ref.get("type") in REFERENCE_TYPES, where
        assert isinstance(ref.get("title"), str) and ref["title"].strip(), where
        check_authors(ref.get("authors"), where)
        assert isinstance(ref.get("year"), int) and 2019 <= ref["year"] <= 2023, where
        arxiv = [i["value"] for i in ref.get("identifiers", []) if str(i.get("value", "")).startswith("arXiv:")]
        assert len(arxiv) == 1 and re.fullmatch(r"arXiv:\d{4}\.\d{5}", arxiv[0]), where
        assert ref["url"] == f"https://arxiv.org/abs/{arxiv[0][6:]}", where
        ids.add(arxiv[0][6:])
    assert ids == CITED


def test_license_is_mit_for_the_deqlab_authors():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the deqlab authors" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text
