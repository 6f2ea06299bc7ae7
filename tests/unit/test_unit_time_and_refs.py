"""Pure helpers, called directly: Contexta's timestamps (TS, T), backup refs and StableRefs.

Expected values come from the formats reference (shared contexta-formats.md, sections 0, 3 and 7),
not from running the code.
"""

import re
from datetime import datetime, timedelta, timezone

import pytest

import contexta_ops as ops

MOMENT = datetime(2026, 11, 26, 3, 44, 18, 629830, tzinfo=timezone.utc)


def test_utc_timestamp_is_isoformat_with_z():
    assert ops._utc_timestamp(MOMENT) == "2026-11-26T03:44:18.629830Z"


def test_utc_timestamp_omits_a_zero_fraction():
    assert ops._utc_timestamp(datetime(2024, 1, 1, tzinfo=timezone.utc)) == "2024-01-01T00:00:00Z"


def test_utc_timestamp_converts_other_zones_to_utc():
    two_hours_east = timezone(timedelta(hours=2))
    assert ops._utc_timestamp(datetime(2026, 1, 1, 1, 0, tzinfo=two_hours_east)) == "2025-12-31T23:00:00Z"


def test_utc_timestamp_without_a_moment_is_now():
    before = datetime.now(timezone.utc)
    stamp = ops._utc_timestamp()
    after = datetime.now(timezone.utc)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$", stamp), stamp
    assert before.replace(microsecond=0) <= ops._parse_timestamp(stamp) <= after


def test_path_safe_timestamp_replaces_colons_and_dots():
    assert ops._path_safe_timestamp("2026-11-26T03:44:18.621364Z") == "2026-11-26T03-44-18_621364Z"
    assert ops._path_safe_timestamp("2024-01-01T00:00:00Z") == "2024-01-01T00-00-00Z"


def test_parse_timestamp_reads_a_ts():
    assert ops._parse_timestamp("2026-11-26T03:44:18.629830Z") == MOMENT
    assert ops._parse_timestamp("2024-01-01T00:00:00Z") == datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("text", ["2024-01-01T00:00:00+00:00", "2024-01-01T00:00:00", "not a timeZ",
                                  "2024-13-01T00:00:00Z", "", None, 1704067200])
def test_parse_timestamp_refuses_anything_but_a_utc_ts(text):
    assert ops._parse_timestamp(text) is None


def test_normalize_timestamp_re_emits_a_ts():
    assert ops._normalize_timestamp("created_at", "2024-01-01T00:00:00.000Z") == "2024-01-01T00:00:00Z"
    assert ops._normalize_timestamp("created_at", "2024-01-01T00:00:00.5Z") == "2024-01-01T00:00:00.500000Z"
    assert ops._normalize_timestamp("created_at", " 2024-01-01T00:00:00.123456Z ") == "2024-01-01T00:00:00.123456Z"


def test_normalize_timestamp_takes_datetimes_naive_as_utc():
    assert ops._normalize_timestamp("created_at", datetime(2024, 1, 1, 12)) == "2024-01-01T12:00:00Z"
    east = datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=5)))
    assert ops._normalize_timestamp("created_at", east) == "2024-01-01T07:00:00Z"


@pytest.mark.parametrize("value", ["2024-01-01T00:00:00+00:00", "2024-01-01 00:00:00Z", "2024-02-30T00:00:00Z",
                                   "2024-01-01T00:00:00.1234567Z", "", 1704067200, None])
def test_normalize_timestamp_refusals_name_the_field(value):
    with pytest.raises(ops.ArtifactError) as caught:
        ops._normalize_timestamp("created_at", value)
    assert caught.value.code == "context_invalid_timestamp"
    assert "created_at" in str(caught.value)


def test_backup_ref_cleans_the_label_like_contexta():
    assert ops._build_backup_ref("My Label!/v1.2", MOMENT) == "My-Label--v1-2-2026-11-26T03-44-18_629830Z"


@pytest.mark.parametrize("label, stem", [
    (None, "backup"), ("", "backup"), ("   ", "backup"), ("//", "backup"), ("-_-", "backup"),
    (" nightly ", "nightly"), ("-_pre_-", "pre"), ("a.b c", "a-b-c"), ("Übung 日本", "Übung-日本"),
    ("tab\there", "tab-here"),
])
def test_backup_ref_labels(label, stem):
    ref = ops._build_backup_ref(label, datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert ref == stem + "-2024-01-01T00-00-00Z"
    assert ops._BACKUP_REF_PATTERN.match(ref).group("label", "ts") == (stem, "2024-01-01T00-00-00Z")


@pytest.mark.parametrize("value, kind, components", [
    ("run:my-proj.run-01", "run", ["my-proj", "run-01"]),
    ("artifact:my-proj.run-01.model", "artifact", ["my-proj", "run-01", "model"]),
    ("sample:a.b.c.d", "sample", ["a", "b", "c", "d"]),
    ("sample:a.b.c.d.e", "sample", ["a", "b", "c", "d", "e"]),
    ("project:" + "x" * 63, "project", ["x" * 63]),
])
def test_validate_ref_returns_the_components(value, kind, components):
    assert ops._validate_ref("some_ref", value, kind) == components


@pytest.mark.parametrize("value, kind, code", [
    (5, "run", "stable_ref_invalid_text"),
    ("run-a.b", "run", "stable_ref_invalid_text"),
    ("run:a:b", "run", "stable_ref_invalid_text"),
    ("Run:a.b", "run", "stable_ref_invalid_kind"),
    ("9run:a.b", "run", "stable_ref_invalid_kind"),
    ("artifact:a.b.c", "run", "stable_ref_kind_mismatch"),
    ("run:a." + "b" * 260, "run", "stable_ref_too_long"),
    ("run:a." + "b" * 64, "run", "stable_ref_invalid_value"),
    ("run:A.b", "run", "stable_ref_invalid_value"),
    ("run:a-.b", "run", "stable_ref_invalid_value"),
    ("run:a..b", "run", "stable_ref_invalid_value"),
    ("run:a_b.c", "run", "stable_ref_invalid_value"),
    ("run:a", "run", "stable_ref_invalid_shape"),
    ("artifact:a.b", "artifact", "stable_ref_invalid_shape"),
    ("sample:a.b.c", "sample", "stable_ref_invalid_shape"),
])
def test_validate_ref_refusals(value, kind, code):
    with pytest.raises(ops.ArtifactError) as caught:
        ops._validate_ref("some_ref", value, kind)
    assert caught.value.code == code
    assert "some_ref" in str(caught.value)
