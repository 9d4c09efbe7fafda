"""Writes a protobuf FileDescriptorSet (binary) to stdout from compiled
`*_pb2.py` modules, in the order given (dependencies first).

Each module holds its .proto file's serialized FileDescriptorProto as the
bytes literal passed to `AddSerializedFile(...)`; a FileDescriptorSet is
those, each as field 1 (length-delimited). Needs no protobuf library.
"""
import ast
import re
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def serialized(path):
    text = open(path, encoding="utf-8").read()
    m = re.search(r"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)", text)
    if not m:
        sys.exit(f"{path}: no AddSerializedFile(b'...') found")
    return ast.literal_eval(m.group(1))


out = bytearray()
for path in sys.argv[1:]:
    proto = serialized(path)
    out += b"\x0a" + varint(len(proto)) + proto
sys.stdout.buffer.write(bytes(out))
