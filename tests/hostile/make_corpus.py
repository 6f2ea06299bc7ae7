"""Write the hostile-input corpus into tests/hostile/corpus/ (checked in; re-run to regenerate).

    python3 tests/hostile/make_corpus.py

Each file is one way an archive can try to escape, lie or break a reader.  cases.json says
which command each file is fed to, and the exit code and error code the tool must answer with.
Absolute and `..` members aim at CANARY, which the tests check is never created.
"""

import hashlib
import io
import json
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CANARY = "/tmp/contexta-ops-hostile-canary"
MTIME = 1700000000

SEGMENT = (b'{"appended_at":"2024-01-01T00:00:00Z","record":{"envelope":{},"payload":{}},"sequence":1}\n')
RECORDS_MANIFEST = json.dumps({"current_segment_id": 1, "current_segment_record_count": 1,
                               "last_committed_sequence": 1, "layout_mode": "jsonl_segments",
                               "layout_version": "1", "next_sequence": 2}, indent=2, sort_keys=True).encode() + b"\n"
FILES = {"workspace/records/segments/segment-000001.jsonl": SEGMENT,
         "workspace/records/manifest.json": RECORDS_MANIFEST}
DIRS = ["workspace", "workspace/records", "workspace/records/segments"]


def file_entries(files=FILES):
    """The manifest's file list by path, as our backups write it."""
    return {path: {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": 0o644,
                   "mtime_ns": MTIME * 10 ** 9} for path, data in sorted(files.items())}


def manifest(files=FILES, entries=None, **changes):
    data = {"backup_ref": "hostile-2024-01-01T00-00-00Z", "created_at": "2024-01-01T00:00:00Z",
            "workspace_root": "/srv/ml/.contexta", "profile_name": "local", "included_sections": ["records"],
            "store_schema_versions": {"artifacts": "v1", "metadata": "1", "records": "1"}, "notes": [],
            "format": "contexta-ops-backup-v1", "tool": {"name": "contexta-ops", "version": "0.1.0"},
            "sections": [{"name": "records", "source": "/srv/ml/.contexta/records", "path": "workspace/records",
                          "kind": "dir", "relocated": False}],
            "files": [entry for _path, entry in sorted((entries or file_entries(files)).items())]}
    data["file_count"] = len(data["files"])
    data["total_bytes"] = sum(entry["size"] for entry in data["files"] if isinstance(entry["size"], int))
    data.update(changes)
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def info(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = size
    member.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    member.mtime = MTIME
    member.linkname = linkname
    return member


def write_tar(name, members, compress=False, out=None):
    """members: (TarInfo, bytes or None) in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    raw = buffer.getvalue()
    if compress:
        import gzip
        raw = gzip.compress(raw, mtime=0)
    ((out or CORPUS) / name).write_bytes(raw)
    return raw


def digest_member(manifest_bytes):
    digest = ("%s  manifest.json\n" % hashlib.sha256(manifest_bytes).hexdigest()).encode()
    return info("manifest.json.sha256", size=len(digest)), digest


def valid_members(manifest_bytes=None):
    manifest_bytes = manifest_bytes or manifest()
    members = [(info("manifest.json", size=len(manifest_bytes)), manifest_bytes)]
    members += [(info(path, tarfile.DIRTYPE), None) for path in DIRS]
    members += [(info(path, size=len(data)), data) for path, data in sorted(FILES.items())]
    return members + [digest_member(manifest_bytes)]


def with_extra(*extra, files=None):
    members = valid_members(manifest(files) if files else None)
    return members[:-1] + list(extra) + members[-1:]


def write_zip(name, entries, out=None, compression=zipfile.ZIP_STORED):
    """entries: (ZipInfo-ish name, data, mode)."""
    with zipfile.ZipFile(str((out or CORPUS) / name), "w") as archive:
        for entry_name, data, mode in entries:
            zinfo = zipfile.ZipInfo(entry_name, date_time=(2024, 1, 1, 0, 0, 0))
            zinfo.external_attr = mode << 16
            zinfo.compress_type = compression
            archive.writestr(zinfo, data)


def patch_zip_member(raw, member_name, local_offset, central_offset, value):
    """Overwrite a field of one member's local and central headers (offsets from each header's start)."""
    raw = bytearray(raw)
    name = member_name.encode()
    for signature, offset, name_at in ((b"PK\x03\x04", local_offset, 30), (b"PK\x01\x02", central_offset, 46)):
        start = raw.find(signature)
        while start >= 0:
            if raw[start + name_at:start + name_at + len(name)] == name:
                raw[start + offset:start + offset + len(value)] = value
            start = raw.find(signature, start + 4)
    return bytes(raw)


def zip_workspace():
    entries = [(".contexta/", b"", stat.S_IFDIR | 0o755), (".contexta/records/", b"", stat.S_IFDIR | 0o755),
               (".contexta/records/segments/", b"", stat.S_IFDIR | 0o755)]
    entries += [(".contexta/" + path[len("workspace/"):], data, stat.S_IFREG | 0o644)
                for path, data in sorted(FILES.items())]
    return entries


def main():
    shutil.rmtree(str(CORPUS), ignore_errors=True)
    CORPUS.mkdir(parents=True)
    cases = {}

    def case(name, exit_code, code, commands=("verify", "verify-only", "apply"), kind="archive", **extra):
        cases[name] = dict({"exit": exit_code, "code": code, "commands": list(commands), "kind": kind}, **extra)

    write_tar("tar-valid.tar", valid_members())
    case("tar-valid.tar", 0, None)
    write_tar("tar-absolute-member.tar", with_extra((info(CANARY + "/absolute.txt", size=4), b"evil")))
    case("tar-absolute-member.tar", 3, "archive_unsafe")
    write_tar("tar-dotdot-member.tar", with_extra(
        (info("workspace/../../../../../.." + CANARY + "/dotdot.txt", size=4), b"evil")))
    case("tar-dotdot-member.tar", 3, "archive_unsafe")
    write_tar("tar-symlink-escape.tar", with_extra((info("workspace/escape", tarfile.SYMTYPE, linkname=CANARY), None),
                                                   (info("workspace/escape/through-link.txt", size=4), b"evil")))
    case("tar-symlink-escape.tar", 3, "archive_unsafe")
    write_tar("tar-hardlink-escape.tar", with_extra((info("workspace/passwd", tarfile.LNKTYPE,
                                                          linkname="/etc/passwd"), None)))
    case("tar-hardlink-escape.tar", 3, "archive_unsafe")
    write_tar("tar-device-file.tar", with_extra((info("workspace/records/null", tarfile.CHRTYPE), None)))
    case("tar-device-file.tar", 3, "archive_unsafe")
    write_tar("tar-fifo.tar", with_extra((info("workspace/records/pipe", tarfile.FIFOTYPE), None)))
    case("tar-fifo.tar", 3, "archive_unsafe")
    path, data = sorted(FILES.items())[0]
    write_tar("tar-duplicate-member.tar", with_extra((info(path, size=len(data)), data)))
    case("tar-duplicate-member.tar", 3, "archive_unsafe")
    write_tar("tar-outside-workspace.tar", with_extra((info("evil.txt", size=4), b"evil")))
    case("tar-outside-workspace.tar", 3, "archive_unsafe")
    lying = dict(FILES)
    lying["workspace/records/manifest.json"] = RECORDS_MANIFEST + b"  "  # the manifest claims 2 more bytes
    write_tar("tar-size-disagrees-with-manifest.tar", valid_members(manifest(lying)))
    case("tar-size-disagrees-with-manifest.tar", 1, None)
    write_tar("tar-manifest-not-first.tar", valid_members()[1:-1] + valid_members()[:1])
    case("tar-manifest-not-first.tar", 3, "recovery_manifest_missing")
    write_tar("tar-manifest-not-json.tar", [(info("manifest.json", size=9), b"{not json")] + valid_members()[1:])
    case("tar-manifest-not-json.tar", 1, "archive_corrupt")
    write_tar("tar-manifest-not-an-object.tar", [(info("manifest.json", size=6), b"[1, 2]")] + valid_members()[1:])
    case("tar-manifest-not-an-object.tar", 3, "recovery_manifest_invalid")
    write_tar("tar-manifest-unsafe-path.tar", valid_members(manifest(files={"workspace/../../x": b"x"})))
    case("tar-manifest-unsafe-path.tar", 3, "recovery_manifest_invalid")
    raw = write_tar("tar-truncated-in-a-member.tar", valid_members())
    (CORPUS / "tar-truncated-in-a-member.tar").write_bytes(raw[:raw.index(SEGMENT) + 20])
    case("tar-truncated-in-a-member.tar", 1, None)
    raw = write_tar("tar-truncated.tar.gz", valid_members(), compress=True)
    (CORPUS / "tar-truncated.tar.gz").write_bytes(raw[:len(raw) * 2 // 3])
    case("tar-truncated.tar.gz", 1, None)
    raw = bytearray(write_tar("tar-flipped-header-byte.tar", valid_members()))
    raw[raw.rindex(b"workspace/records/manifest.json")] ^= 0x20  # in its tar header: the header checksum fails
    (CORPUS / "tar-flipped-header-byte.tar").write_bytes(bytes(raw))
    case("tar-flipped-header-byte.tar", 1, None)
    raw = bytearray(write_tar("tar-flipped-data-byte.tar", valid_members()))
    raw[raw.index(SEGMENT) + 10] ^= 1
    (CORPUS / "tar-flipped-data-byte.tar").write_bytes(bytes(raw))
    case("tar-flipped-data-byte.tar", 1, None)
    raw = bytearray(write_tar("tar-flipped-manifest-byte.tar", valid_members()))
    raw[raw.index(b'"created_at": "2024') + 19] ^= 1  # still valid JSON; only the manifest digest can tell
    (CORPUS / "tar-flipped-manifest-byte.tar").write_bytes(bytes(raw))
    case("tar-flipped-manifest-byte.tar", 1, None)
    write_tar("tar-missing-manifest-digest.tar", valid_members()[:-1])
    case("tar-missing-manifest-digest.tar", 1, None)
    (CORPUS / "not-an-archive.tar").write_bytes(b"this is text, not a tar\n" * 40)
    case("not-an-archive.tar", 3, "recovery_backup_invalid")

    write_zip("zip-valid.zip", zip_workspace())
    case("zip-valid.zip", 0, None, ("verify-only", "apply"))
    write_zip("zip-absolute-member.zip", zip_workspace() + [(CANARY + "/absolute.txt", b"evil", stat.S_IFREG | 0o644)])
    case("zip-absolute-member.zip", 3, "archive_unsafe", ("verify-only", "apply"))
    write_zip("zip-dotdot-member.zip", zip_workspace() + [(".contexta/../../../.." + CANARY + "/dotdot.txt", b"evil",
                                                           stat.S_IFREG | 0o644)])
    case("zip-dotdot-member.zip", 3, "archive_unsafe", ("verify-only", "apply"))
    write_zip("zip-symlink-member.zip", zip_workspace() + [(".contexta/escape", CANARY.encode(), stat.S_IFLNK | 0o777)])
    case("zip-symlink-member.zip", 3, "archive_unsafe", ("verify-only", "apply"))
    write_zip("zip-device-member.zip", zip_workspace() + [(".contexta/records/null", b"", stat.S_IFCHR | 0o644)])
    case("zip-device-member.zip", 3, "archive_unsafe", ("verify-only", "apply"))
    write_zip("zip-duplicate-member.zip", zip_workspace() + [zip_workspace()[-1]])
    case("zip-duplicate-member.zip", 3, "archive_unsafe", ("verify-only", "apply"))
    write_zip("zip-two-top-folders.zip", zip_workspace() + [("other/x.txt", b"x", stat.S_IFREG | 0o644)])
    case("zip-two-top-folders.zip", 3, "recovery_backup_invalid", ("verify-only", "apply"))
    write_zip("zip-lying-size.zip", zip_workspace())
    raw = bytearray((CORPUS / "zip-lying-size.zip").read_bytes())
    size = len(SEGMENT).to_bytes(4, "little")
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size, local and central
        start = 0
        while True:
            start = raw.find(signature, start)
            if start < 0:
                break
            field = start + offset
            if raw[field:field + 4] == size:
                raw[field:field + 4] = (len(SEGMENT) + 7).to_bytes(4, "little")
            start += 4
    (CORPUS / "zip-lying-size.zip").write_bytes(bytes(raw))
    case("zip-lying-size.zip", 1, None, ("verify-only", "apply"))
    (CORPUS / "garbage.zip").write_bytes(b"PK but not really a zip\n")
    case("garbage.zip", 3, "recovery_backup_invalid", ("verify-only", "apply"))

    # Modes a restore must never apply as they are (root restoring would plant a setuid file).
    setuid = {path: dict(entry, mode=0o6777) for path, entry in file_entries().items()}
    members = valid_members(manifest(entries=setuid))
    for member, _data in members:
        if member.name.startswith("workspace"):
            member.mode = 0o1777 if member.isdir() else 0o6777
    write_tar("tar-setuid-modes.tar", members)
    case("tar-setuid-modes.tar", 0, None, warning="mode_masked")
    write_zip("zip-setuid-modes.zip", [(name, data, (mode & ~0o7777) | (0o1777 if mode & stat.S_IFDIR else 0o6777))
                                       for name, data, mode in zip_workspace()])
    case("zip-setuid-modes.zip", 0, None, ("verify-only", "apply"), warning="mode_masked")
    # A member longer than the manifest says: never read, let alone staged, past what was declared.
    longer = [(info(member.name, size=len(data) + 4096), data + b"\n" * 4096)
              if member.name == "workspace/records/segments/segment-000001.jsonl" else (member, data)
              for member, data in valid_members()]
    write_tar("tar-member-larger-than-manifest.tar", longer)
    case("tar-member-larger-than-manifest.tar", 1, None, problem="size_mismatch")
    bad_entry = dict(file_entries()["workspace/records/manifest.json"], mode=2 ** 70)
    write_tar("tar-manifest-mode-out-of-range.tar", valid_members(manifest(
        entries=dict(file_entries(), **{"workspace/records/manifest.json": bad_entry}))))
    case("tar-manifest-mode-out-of-range.tar", 3, "recovery_manifest_invalid", ("verify", "verify-only", "apply", "plan"))
    write_tar("tar-manifest-total-bytes-is-text.tar", valid_members(manifest(total_bytes="y")))
    case("tar-manifest-total-bytes-is-text.tar", 3, "recovery_manifest_invalid",
         ("verify", "verify-only", "apply", "plan"))
    members = valid_members()
    members[1][0].pax_headers = {"mtime": "1e30"}  # the workspace directory, from the year 10**22
    write_tar("tar-member-mtime-out-of-range.tar", members)
    case("tar-member-mtime-out-of-range.tar", 3, "archive_unsafe")
    no_files = json.loads(manifest())
    del no_files["files"]
    no_files = json.dumps(no_files).encode()
    write_tar("tar-manifest-without-files.tar", valid_members(no_files))
    case("tar-manifest-without-files.tar", 3, "recovery_manifest_invalid", ("verify", "verify-only", "apply", "plan"))
    for name, flag, method in (("zip-encrypted-member.zip", 0x1, None), ("zip-unknown-method.zip", None, 99)):
        write_zip(name, zip_workspace())
        raw = (CORPUS / name).read_bytes()
        if flag is not None:
            raw = patch_zip_member(raw, ".contexta/records/manifest.json", 6, 8, flag.to_bytes(2, "little"))
        else:
            raw = patch_zip_member(raw, ".contexta/records/manifest.json", 8, 10, method.to_bytes(2, "little"))
        (CORPUS / name).write_bytes(raw)
        case(name, 3, "archive_unsupported", ("verify-only", "apply"))

    # Backup manifests: each replaces the manifest.json of a copy of the fixture's contexta backup.
    def bad_manifest(name, text, exit_code=3, code="recovery_manifest_invalid"):
        (CORPUS / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        case(name, exit_code, code, ("verify", "verify-only", "apply", "plan"), kind="manifest")

    good = json.loads(manifest())
    for name, change in (("manifest-sections-not-a-list.json", {"included_sections": "records"}),
                         ("manifest-files-not-a-list.json", {"files": {"a": 1}}),
                         ("manifest-file-size-is-text.json", {"files": [dict(good["files"][0], size="12")]}),
                         ("manifest-file-digest-short.json", {"files": [dict(good["files"][0], sha256="abc")]}),
                         ("manifest-file-listed-twice.json", {"files": [good["files"][0], good["files"][0]]}),
                         ("manifest-file-mode-is-text.json", {"files": [dict(good["files"][0], mode="644")]}),
                         ("manifest-backup-ref-is-a-number.json", {"backup_ref": 7}),
                         ("manifest-section-path-escapes.json", {"sections": [{"name": "records",
                                                                               "path": "../../etc"}]}),
                         ("manifest-section-path-outside-workspace.json", {"sections": [{"name": "records",
                                                                                         "path": "records"}]}),
                         ("manifest-file-path-outside-workspace.json",
                          {"files": [dict(good["files"][0], path="records/manifest.json")]}),
                         ("manifest-total-bytes-is-text.json", {"total_bytes": "y"}),
                         ("manifest-file-count-negative.json", {"file_count": -1}),
                         ("manifest-file-mode-too-large.json", {"files": [dict(good["files"][0], mode=2 ** 70)]}),
                         ("manifest-file-mode-negative.json", {"files": [dict(good["files"][0], mode=-1)]}),
                         ("manifest-file-mode-beyond-permissions.json",
                          {"files": [dict(good["files"][0], mode=0o170644)]}),
                         ("manifest-file-mtime-is-a-float.json", {"files": [dict(good["files"][0], mtime_ns=1e30)]}),
                         ("manifest-file-mtime-too-large.json", {"files": [dict(good["files"][0], mtime_ns=2 ** 64)]}),
                         ("manifest-file-mtime-too-small.json",
                          {"files": [dict(good["files"][0], mtime_ns=-2 ** 63 - 1)]}),
                         ("manifest-file-size-negative.json", {"files": [dict(good["files"][0], size=-5)]}),
                         ("manifest-file-size-too-large.json", {"files": [dict(good["files"][0], size=2 ** 63)]}),
                         ("manifest-file-size-is-a-bool.json", {"files": [dict(good["files"][0], size=True)]}),
                         ("manifest-created-at-is-a-number.json", {"created_at": 5}),
                         ("manifest-format-is-a-list.json", {"format": ["contexta-ops-backup-v1"]}),
                         ("manifest-backup-ref-escapes.json", {"backup_ref": "../../../../tmp/contexta-ops-escape"}),
                         ("manifest-backup-ref-has-a-newline.json", {"backup_ref": "nightly\n2024"})):
        bad_manifest(name, json.dumps(dict(good, **change)))
    bad_manifest("manifest-truncated.json", manifest()[:200])
    bad_manifest("manifest-not-utf8.json", b'{"backup_ref": "\xff\xfe"}')
    bad_manifest("manifest-huge-line.json", json.dumps(dict(good, notes=["x" * (2 << 20)]))[:-3])
    bad_manifest("manifest-array.json", "[]")

    # Outbox lines: each file is a whole outbox; every line must be dead-lettered, none may block.
    def bad_outbox(name, lines):
        (CORPUS / name).write_bytes(b"".join(lines))
        case(name, 1, None, ("replay",), kind="outbox")

    valid = (json.dumps({"replay_ref": "ok-1", "family": "RECORD", "sink_name": "local-jsonl-replay",
                         "payload": {"v": 1}}) + "\n").encode()
    bad_outbox("outbox-not-json.jsonl", [b"not json at all\n", valid])
    bad_outbox("outbox-not-an-object.jsonl", [b"[1, 2, 3]\n", b'"text"\n', valid])
    bad_outbox("outbox-missing-family.jsonl", [b'{"replay_ref": "x", "payload": {}}\n', valid])
    bad_outbox("outbox-missing-payload.jsonl", [b'{"replay_ref": "x", "family": "RECORD"}\n', valid])
    bad_outbox("outbox-unknown-family.jsonl", [b'{"replay_ref": "x", "family": "METRIC", "payload": {}}\n', valid])
    bad_outbox("outbox-not-utf8.jsonl", [b'{"replay_ref": "\xff", "family": "RECORD", "payload": {}}\n', valid])
    bad_outbox("outbox-huge-line.jsonl", [b'{"replay_ref": "big", "family": "RECORD", "payload": "' +
                                          b"x" * (1 << 20) + b'"\n', valid])
    bad_outbox("outbox-truncated-last-line.jsonl", [valid, b'{"replay_ref": "torn", "fam'])

    # Configs: each is a --config file.
    def bad_config(name, text):
        (CORPUS / name).write_text(text)
        case(name, 3, None, ("config",), kind="config")

    bad_config("config-not-json.json", "{workspace: ")
    bad_config("config-unknown-section.json", json.dumps({"mystery": {}}))
    bad_config("config-path-is-a-number.json", json.dumps({"workspace": {"root_path": 5}}))
    bad_config("config-bool-is-text.json", json.dumps({"recovery": {"create_backup_before_restore": "maybe"}}))
    bad_config("config-unknown-setting.json", json.dumps({"recovery": {"backup_dir": "/x"}}))
    bad_config("config-top-level-list.json", "[]")

    (HERE / "cases.json").write_text(json.dumps(cases, indent=2, sort_keys=True) + "\n")
    print("%d files in %s" % (len(cases), CORPUS))


# -- generated at test time: too big (or too deep) to check in -------------------------------------------

ALL_COMMANDS = ["verify", "verify-only", "apply", "plan"]
DEEP = 100000
GENERATED = {
    "manifest-nested-100000-deep.json": {"exit": 3, "code": "recovery_manifest_invalid", "commands": ALL_COMMANDS,
                                         "kind": "manifest"},
    "manifest-1000001-files.json": {"exit": 3, "code": "recovery_manifest_invalid", "commands": ALL_COMMANDS,
                                    "kind": "manifest", "slow": True},
    "manifest-257-mib.json": {"exit": 3, "code": "recovery_manifest_invalid", "commands": ALL_COMMANDS,
                              "kind": "manifest", "slow": True},
    "config-nested-100000-deep.json": {"exit": 3, "code": None, "commands": ["config"], "kind": "config"},
    "tar-manifest-nested-100000-deep.tar": {"exit": 1, "code": "archive_corrupt", "commands": ALL_COMMANDS,
                                            "kind": "archive"},
    "tar-pax-header-2-mib.tar": {"exit": 1, "code": None, "commands": ["verify", "verify-only", "apply"],
                                 "kind": "archive", "problem": "archive_corrupt"},
    "tar-member-50-mib-manifest-says-less.tar": {"exit": 1, "code": None, "commands": ["verify", "verify-only",
                                                                                       "apply"],
                                                 "kind": "archive", "problem": "size_mismatch"},
    "zip-bomb-with-a-lying-size.zip": {"exit": 1, "code": None, "commands": ["verify-only", "apply"],
                                       "kind": "archive", "problem": "archive_corrupt"},
}
BOMB_MEMBER = ".contexta/records/quarantine/bomb.bin"


def write_zip_bomb(out, name="zip-bomb.zip", size=64 << 20, claimed=None):
    """A valid workspace zip plus one member of ``size`` zero bytes, deflated to a thousandth of that.

    With ``claimed``, both headers say the member inflates to ``claimed`` bytes instead.
    """
    write_zip(name, zip_workspace() + [(BOMB_MEMBER, bytes(size), stat.S_IFREG | 0o644)], out=out,
              compression=zipfile.ZIP_DEFLATED)
    if claimed is not None:
        raw = (out / name).read_bytes()
        raw = patch_zip_member(raw, BOMB_MEMBER, 22, 24, claimed.to_bytes(4, "little"))
        (out / name).write_bytes(raw)
    return out / name


def _many_files_manifest(path, count):
    empty = hashlib.sha256(b"").hexdigest()
    entries = ",".join('{"path": "workspace/records/f%d", "size": 0, "sha256": "%s", "mode": 420}' % (index, empty)
                       for index in range(count))
    path.write_text('{"backup_ref": "many", "files": [%s]}' % entries)


def _huge_manifest(path, size):
    with open(str(path), "wb") as handle:
        handle.write(b'{"backup_ref": "huge", "notes": ["')
        chunk = b"x" * (1 << 20)
        for _ in range(size >> 20):
            handle.write(chunk)
        handle.write(b'"]}')


def write_generated(name, out):
    """Write the generated case ``name`` into directory ``out``; returns its path."""
    path = out / name
    if name == "manifest-nested-100000-deep.json" or name == "config-nested-100000-deep.json":
        path.write_text("[" * DEEP + "]" * DEEP if name.startswith("manifest") else '{"workspace": ' + "[" * DEEP)
    elif name == "manifest-1000001-files.json":
        _many_files_manifest(path, 1000001)
    elif name == "manifest-257-mib.json":
        _huge_manifest(path, 257 << 20)
    elif name == "tar-manifest-nested-100000-deep.tar":
        deep = ("[" * DEEP + "]" * DEEP).encode()
        write_tar(name, [(info("manifest.json", size=len(deep)), deep)] + valid_members()[1:], out=out)
    elif name == "tar-pax-header-2-mib.tar":
        members = valid_members()
        members[-2][0].pax_headers = {"comment": "x" * (2 << 20)}
        write_tar(name, members, out=out)
    elif name == "tar-member-50-mib-manifest-says-less.tar":
        big = b"\n" * (50 << 20)
        write_tar(name, [(info(member.name, size=len(big)), big)
                         if member.name == "workspace/records/segments/segment-000001.jsonl" else (member, data)
                         for member, data in valid_members()], out=out)
    elif name == "zip-bomb-with-a-lying-size.zip":
        write_zip_bomb(out, name, claimed=1000)
    else:
        raise KeyError(name)
    return path


if __name__ == "__main__":
    main()
