#!/usr/bin/env python3
"""Write small valid inputs for each fuzz target into fuzz/seeds/<target>/.

Why: random bytes almost never form a valid postcard manifest or ticket, so without
seeds the fuzzer spends its time in the first few error paths. These seeds are
hand-encoded postcard (varints, length-prefixed strings and vectors, enum variants
as varint indexes), matching the derives in transfer/src/{manifest,frame,ticket}.rs.
Re-run after a wire-format change: python3 fuzz/seeds/make_seeds.py

Names: `ok_*` must be accepted and `bad_*` refused by the target's body (the replay
test in fuzz-bodies/tests/replay.rs checks both); `crash_*` are regression inputs of
crashes the fuzzer found, which must only not panic. The store_records seeds are
encoded by the real types: cargo run -p octopus-fuzz-bodies --example make_seeds
"""
import base64
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string(s):
    b = s.encode()
    return varint(len(b)) + b


def seq(items):
    return varint(len(items)) + b"".join(items)


def entry_dir(path, mode=0o755):
    return string(path) + varint(mode) + varint(0)


def entry_file(path, size, pieces=(), mode=0o644):
    return (string(path) + varint(mode) + varint(1) + varint(size) + bytes([7] * 16)
            + seq([bytes([i % 256] * 16) for i in pieces]))


def entry_link(path, target):
    return string(path) + varint(0o777) + varint(2) + string(target)


def manifest(piece_size, threshold, entries):
    return bytes([1]) + varint(piece_size) + varint(threshold) + seq(entries)


def v4(ip, port):
    return varint(0) + bytes(ip) + varint(port)


def v6(ip16, port):
    return varint(1) + bytes(ip16) + varint(port)


def frame(body):
    return struct.pack(">I", len(body)) + body


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


MIB = 1 << 20
m_small = manifest(65536, MIB, [entry_file("a.txt", 12)])
m_tree = manifest(65536, 65536, [
    entry_dir("root"), entry_dir("root/etc"),
    entry_file("root/etc/x.conf", 100),
    entry_file("root/big.bin", 3 * 65536 + 5, pieces=range(4)),
    entry_link("root/link", "etc/x.conf"),
    entry_file("root/empty", 0),
])
write("manifest_decode", "ok_small", m_small)
write("manifest_decode", "ok_tree", m_tree)

content = bytes(range(16))
write("frame_decode", "ok_hello", frame(varint(0) + content + b"\x01"))
write("frame_decode", "ok_welcome", frame(varint(1)))
write("frame_decode", "ok_manifest", frame(varint(2) + varint(len(m_tree)) + m_tree))
write("frame_decode", "ok_announce", frame(varint(3) + seq([v4([10, 0, 0, 1], 4000)]) + seq([string("idc=bj1")])))
write("frame_decode", "ok_peers", frame(varint(4) + seq(
    [v4([127, 0, 0, 1], 9) + bytes([3] * 32), v6([0] * 15 + [1], 9) + bytes([4] * 32)])))
# Swarm(Bitfield { len, bytes }), Swarm(Request(9)).
write("frame_decode", "ok_bitfield", frame(varint(5) + varint(0) + varint(13) + seq([b"\xff", b"\xf8"])))
write("frame_decode", "ok_request", frame(varint(5) + varint(2) + varint(9)))
write("frame_decode", "ok_piece_header", b"\x50" + content + struct.pack(">II", 77, MIB))

ticket = content + seq([v4([127, 0, 0, 1], 7000), v6([0] * 15 + [1], 7000)]) + bytes([4] * 32)
b32 = base64.b32encode(ticket).decode().rstrip("=").lower()
write("ticket_decode", "ok_ticket", ("octo1" + b32).encode())

# Invalid inputs: each must be refused.
write("manifest_decode", "bad_version", bytes([2]) + m_small[1:])
write("manifest_decode", "bad_dotdot", manifest(65536, MIB, [entry_dir("root"), entry_file("root/../x", 1)]))
write("manifest_decode", "bad_absolute", manifest(65536, MIB, [entry_file("/etc/passwd", 1)]))
write("manifest_decode", "bad_no_parent", manifest(65536, MIB, [entry_dir("root"), entry_file("root/d/x", 1)]))
write("manifest_decode", "bad_nul", manifest(65536, MIB, [entry_file("a\0b", 1)]))
write("manifest_decode", "bad_link_escape", manifest(65536, MIB, [entry_dir("root"), entry_link("root/l", "../../etc")]))
write("manifest_decode", "bad_link_absolute", manifest(65536, MIB, [entry_dir("root"), entry_link("root/l", "/etc")]))
write("manifest_decode", "bad_through_link", manifest(65536, MIB, [
    entry_dir("root"), entry_link("root/l", "."), entry_file("root/l/x", 1)]))
write("manifest_decode", "bad_trailing", m_small + b"\0")
# Each link stays inside the root lexically, but r/m climbs from where r/a/l points.
write("manifest_decode", "bad_link_chain_escape", manifest(65536, MIB, [
    entry_dir("root"), entry_dir("root/a"), entry_link("root/a/l", ".."),
    entry_link("root/m", "a/l/../../etc/shadow")]))
write("frame_decode", "bad_empty", b"")
write("frame_decode", "bad_huge_length", struct.pack(">I", 0xFFFFFFFF) + b"\0")
write("frame_decode", "bad_short", frame(varint(0) + content)[:-3])
write("ticket_decode", "bad_prefix", ("octo2" + b32).encode())
write("ticket_decode", "bad_cut", ("octo1" + b32[:-7]).encode())
write("ticket_decode", "bad_empty", b"")

# Control messages are postcard in a 4-byte length frame (agent/src/proto.rs); the
# valid ones are generated by the Rust example with the real types.
write("control_decode", "bad_empty", b"")
write("control_decode", "bad_huge_length", struct.pack(">I", 0xFFFFFFFF) + b"\0")

for name, text in [
    ("ok_all", "all"), ("ok_host", "h1"), ("ok_tags", "role=web,dc=x"),
    ("ok_glob", "web-*"), ("ok_mixed", "web-1, db-?,role=db"),
    ("bad_empty", ""), ("bad_two_values", "role=a,role=b"), ("bad_chars", "web;rm"), ("bad_invalid_utf8", None),
]:
    write("target_parse", name, b"\xff\xfe" if text is None else text.encode())

for name, text in [
    ("ok_span", "1000\nbytes=0-99"), ("ok_open", "1000\nbytes=500-"),
    ("ok_suffix", "1000\nbytes=-100"), ("ok_past_end", "1000\nbytes=900-5000"),
    ("ok_spaces", "10\n bytes= 3 - 4 "),
    ("bad_reversed", "1000\nbytes=9-3"), ("bad_start_past_end", "1000\nbytes=1000-"),
    ("bad_two_ranges", "1000\nbytes=0-1,5-6"), ("bad_zero_suffix", "1000\nbytes=-0"),
    ("bad_empty_file", "0\nbytes=0-"), ("bad_unit", "1000\nitems=0-1"),
    ("bad_overflow", "1000\nbytes=99999999999999999999-"),
]:
    write("pool_range", name, text.encode())

for name, text in [
    ("ok_count", "5"), ("ok_percent", "25%"), ("ok_hundred", "100%"),
    ("bad_zero", "0"), ("bad_zero_percent", "0%"), ("bad_over", "101%"),
    ("bad_text", "half"), ("bad_negative", "-1"), ("bad_empty", ""),
]:
    write("batch_parse", name, text.encode())

for name, text in [
    ("ok_file", "/tmp/octo-fuzz-x/file.bin"), ("ok_dir", "/tmp/octo-fuzz-x/dir/"),
    ("bad_relative", "tmp/x"), ("bad_dotdot", "/tmp/../etc/passwd"),
    ("bad_dot", "/tmp/./x"), ("bad_empty", ""),
]:
    write("check_dest", name, text.encode())

for name, text in [
    ("ok_bytes", "500"), ("ok_kb", "500KB"), ("ok_mib_s", "10MiB/s"),
    ("ok_mbit", "100Mbit"), ("ok_fraction", "1.5G"), ("ok_ps", "2MBps"),
    ("bad_zero", "0"), ("bad_unit", "10 parsecs"), ("bad_huge", "1e30"),
    ("bad_too_big", "100000GB"), ("bad_empty", ""), ("bad_dot", "."),
]:
    write("parse_rate", name, text.encode())

token = "octo_" + "a" * 13 + "_" + "b" * 32
fp = "0123456789abcdef" * 4
for name, text in [
    ("ok_token", token + "." + fp), ("ok_upper_hex", token + "." + fp.upper()),
    ("ok_newline", token + "." + fp + "\n"),
    ("bad_no_fp", token), ("bad_short_fp", token + "." + fp[:-2]),
    ("bad_not_hex", token + "." + "g" * 64), ("bad_plus_hex", token + "." + "+f" * 32),
    ("bad_multibyte_fp", token + "." + "a" + "\u20ac" + "b" * 60),
    ("bad_empty", ""),
]:
    write("enroll_token", name, text.encode())

for name, text in [
    ("ok_entry", b"t42-0000000007"), ("ok_max_seq", b"t1-2147483647"),
    ("ok_header", b'{"size":10,"chunks":1,"sha256":"00"}'),
    ("ok_header_two_chunks", b'{"size":524289,"chunks":2,"sha256":"00"}'),
    ("bad_seq_short", b"t42-7"), ("bad_seq_over", b"t1-2147483648"),
    ("bad_no_t", b"42-0000000007"), ("bad_header_size", b'{"size":99999999,"chunks":191,"sha256":"00"}'),
    ("bad_header_chunks", b'{"size":10,"chunks":0,"sha256":"00"}'),
    ("bad_header_field", b'{"size":10}'), ("bad_empty", b""),
]:
    write("zk_queue", name, text)

# store_records: the first byte picks the kind (see fuzz-bodies/src/records.rs).
for name, data in [
    ("bad_empty", b""), ("bad_token_cut", b"\x00\x05ab"), ("bad_zk_over_cap", bytes([9]) + b"\x01" * 100),
    ("bad_counter_overlong", bytes([5]) + b"\xff" * 11),
]:
    write("store_records", name, data)
