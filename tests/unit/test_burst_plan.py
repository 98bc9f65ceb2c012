"""Planning: grouping, continuation pages, problems with page numbers, stable keys."""

from __future__ import annotations

from postroom.burst.plan import PageScan, format_pages, make_plan
from postroom.burst.tags import find_tags


def page(n: int, text: str = "") -> PageScan:
    return PageScan(n, tuple(find_tags(text)))


A = "<pdfexplode>a@x.example</pdfexplode>"
B = "[[postroom to=b@x.example]]"
EMPTY = "<pdfexplode></pdfexplode>"


def test_consecutive_grouping_with_continuation_pages() -> None:
    plan = make_plan([page(1, A), page(2), page(3, A), page(4, B), page(5), page(6, A)])
    assert [(m.tag.to, m.pages) for m in plan.messages] == [
        (("a@x.example",), (1, 2, 3)),
        (("b@x.example",), (4, 5)),
        (("a@x.example",), (6,)),
    ]
    assert plan.errors == () and plan.unsent_pages == ()


def test_all_grouping_gathers_pages_anywhere() -> None:
    plan = make_plan([page(1, A), page(2, B), page(3, A), page(4)], group="all")
    assert [(m.tag.to, m.pages) for m in plan.messages] == [(("a@x.example",), (1, 3, 4)), (("b@x.example",), (2,))]


def test_untagged_report_mode_and_cover_page() -> None:
    plan = make_plan([page(1), page(2, A), page(3)], untagged="report")
    assert [str(p) for p in plan.problems] == [
        "warning: page 1: no tag before this page; it is not sent",
        "error: page 3: page has no tag (untagged pages are reported)",
    ]
    assert plan.unsent_pages == (1, 3)


def test_empty_tag_ends_the_document() -> None:
    plan = make_plan([page(1, A), page(2, EMPTY), page(3), page(4, A)])
    assert [m.pages for m in plan.messages] == [(1,), (4,)]
    assert plan.unsent_pages == (2, 3)


def test_conflicting_tags_and_bad_tag_are_errors_with_page_numbers() -> None:
    plan = make_plan([page(1, A + B), PageScan(2, error="invalid address 'x'"), page(3), page(4, A)])
    assert [(p.page, p.severity) for p in plan.errors] == [(1, "error"), (2, "error")]
    assert "2 different tags" in plan.errors[0].text
    assert [m.invalid for m in plan.messages] == [True, True, False]
    assert plan.messages[1].pages == (2, 3)  # the bad tag's continuation pages go nowhere
    clean = plan.without_invalid()
    assert [m.pages for m in clean.messages] == [(4,)] and clean.unsent_pages == (1, 2, 3)


def test_missing_template_and_recipient_limit() -> None:
    tag = "<pdfexplode>x%INV#a@x.example</pdfexplode>"
    plan = make_plan([page(1, tag)], templates={"default"})
    assert "message id 'INV'" in plan.errors[0].text
    many = "[[postroom to=a@x.example; cc=b@x.example, c@x.example]]"
    plan = make_plan([page(1, many)], max_recipients=2)
    assert "3 recipients" in plan.errors[0].text


def test_no_tags_at_all_is_an_error() -> None:
    plan = make_plan([page(1), page(2)])
    assert plan.messages == () and plan.errors[0].page == 0


def test_differing_values_for_same_recipient_is_a_warning() -> None:
    plan = make_plan(
        [page(1, "<pdfexplode>1%a@x.example</pdfexplode>"), page(2, "<pdfexplode>2%a@x.example</pdfexplode>")]
    )
    assert len(plan.messages) == 1 and plan.messages[0].tag.variables == (("v1", "1"),)
    assert plan.warnings[0].page == 2


def test_keys_are_stable_and_distinct() -> None:
    scans = [page(1, A), page(2, B), page(3, A)]
    k1 = [m.key for m in make_plan(scans).messages]
    k2 = [m.key for m in make_plan(list(reversed(scans))).messages]
    assert k1 == k2 and len(set(k1)) == 3


def test_format_pages() -> None:
    assert format_pages([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
