#!/usr/bin/env python3
"""Write small valid inputs for each fuzz target into fuzz/seeds/<target>/.

Why: random bytes almost never form a valid postcard manifest or ticket, so without
seeds the fuzzer spends its time in the first few error paths. These seeds are
hand-encoded postcard (varints, length-prefixed strings and vectors, enum variants
as varint indexes), matching the derives in transfer/src/{manifest,frame,ticket}.rs.
Re-run after a wire-format change: python3 fuzz/seeds/make_seeds.py
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
m_tree = manifest(65536, MIB, [
    entry_dir("root"), entry_dir("root/etc"),
    entry_file("root/etc/x.conf", 100),
    entry_file("root/big.bin", 3 * 65536 + 5, pieces=range(4)),
    entry_link("root/link", "etc/x.conf"),
    entry_file("root/empty", 0),
])
write("manifest_decode", "small", m_small)
write("manifest_decode", "tree", m_tree)

content = bytes(range(16))
write("frame_decode", "hello", frame(varint(0) + content + b"\x01"))
write("frame_decode", "welcome", frame(varint(1)))
write("frame_decode", "manifest", frame(varint(2) + varint(len(m_tree)) + m_tree))
write("frame_decode", "announce", frame(varint(3) + seq([v4([10, 0, 0, 1], 4000)])))
write("frame_decode", "peers", frame(varint(4) + seq(
    [v4([127, 0, 0, 1], 9) + bytes([3] * 32), v6([0] * 15 + [1], 9) + bytes([4] * 32)])))
# Swarm(Bitfield { len, bytes }), Swarm(Request(9)).
write("frame_decode", "bitfield", frame(varint(5) + varint(0) + varint(13) + seq([b"\xff", b"\xf8"])))
write("frame_decode", "request", frame(varint(5) + varint(2) + varint(9)))
write("frame_decode", "piece_header", b"\x50" + content + struct.pack(">II", 77, MIB))

ticket = content + seq([v4([127, 0, 0, 1], 7000), v6([0] * 15 + [1], 7000)]) + bytes([4] * 32)
b32 = base64.b32encode(ticket).decode().rstrip("=").lower()
write("ticket_decode", "ticket", ("octo1" + b32).encode())
