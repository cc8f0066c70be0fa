#!/usr/bin/env python3
"""Writes the safetensors corpus replayed by ctest (safetensors.corpus) and used as the fuzzer's
seeds: valid/ files must be accepted, invalid/ files rejected (one per validation rule).
The files are committed; rerun this script only to change the corpus."""
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).parent


def image(header, data=b"", length=None, pad=True):
    text = header if isinstance(header, bytes) else header.encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def header(entries, metadata=None):
    obj = {} if metadata is None else {"__metadata__": metadata}
    obj.update(entries)
    return json.dumps(obj, separators=(",", ":"))


SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}

valid = {
    "empty": image("{}"),
    "metadata_only": image(header({}, {"format": "pt", "note": "caf\u00e9"})),
    "all_dtypes": None,
    "zero_size_and_scalar": image(header({"z": entry("F32", [0, 7], 0, 0), "s": entry("F64", [], 0, 8)}), bytes(8)),
    "unsorted_header": image(header({"b": entry("U8", [2], 4, 6), "a": entry("F32", [1], 0, 4)}), bytes(6)),
    "hf_packed_layer": image(header({"l.weight": entry("U8", [2, 2], 0, 4), "l.weight_scale": entry("BF16", [1], 4, 6)}),
                             bytes([18, 8, 9, 9, 0x40, 0x3D])),
    "unpadded_header": image(header({"t": entry("I8", [3], 0, 3)}), b"\x01\xff\x00", pad=False),
    "whitespace_in_header": image('{ "t" : { "dtype" : "I16", "shape" : [ 1 ], "data_offsets" : [ 0, 2 ] } }\n', b"\x01\x02"),
    "escaped_name": image(header({"a\"b\\u00e9\n": entry("U8", [1], 0, 1)}), b"\x07"),
}
offset, entries, data = 0, {}, b""
for name, size in SIZES.items():
    entries["t_" + name] = entry(name, [2, 1], offset, offset + 2 * size)
    data += bytes([1] + [0] * (size - 1)) * 2  # the value 1 (or a tiny float) twice; BOOL 1
    offset += 2 * size
valid["all_dtypes"] = image(header(entries), data)

ok = entry("F32", [2], 0, 8)
invalid = {
    "too_short": b"\x02\x00\x00",
    "header_too_large": image("{}", length=100_000_001),
    "header_past_end": image("{}", length=64),
    "header_length_max": image("{}", length=2**64 - 1),
    "invalid_utf8": image(b'{"\xc3\x28":{}}'),
    "surrogate_utf8": image(b'{"\xed\xa0\x80":{}}'),
    "not_brace": image(" {}"),
    "empty_header": image(b"", pad=False),
    "invalid_json": image('{"t":'),
    "nul_after_json": image(b"{}\x00\x00", pad=False),
    "not_object": image("[1]"),
    "duplicate_name": image('{"t":%s,"t":%s}' % (json.dumps(ok), json.dumps(ok)), bytes(8)),
    "duplicate_field": image('{"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
    "entry_not_object": image('{"t":[1]}'),
    "unknown_field": image('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', bytes(8)),
    "missing_field": image('{"t":{"dtype":"F32","shape":[2]}}'),
    "dtype_not_string": image('{"t":{"dtype":4,"shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "unknown_dtype": image(header({"t": entry("F31", [1], 0, 4)}), bytes(4)),
    "shape_not_array": image('{"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}}', bytes(8)),
    "negative_dim": image(header({"t": entry("F32", [-2], 0, 8)}), bytes(8)),
    "float_dim": image('{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', bytes(8)),
    "offsets_one": image('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', bytes(8)),
    "offsets_negative": image(header({"t": entry("F32", [2], -8, 0)}), bytes(8)),
    "end_before_begin": image(header({"t": entry("F32", [0], 8, 0)}), bytes(8)),
    "shape_overflow": image(header({"t": entry("F32", [2**32, 2**32], 0, 0)})),
    "bytes_overflow": image(header({"t": entry("F64", [2**61], 0, 0)})),
    "size_mismatch": image(header({"t": entry("F32", [3], 0, 8)}), bytes(8)),
    "gap": image(header({"t": entry("F32", [2], 4, 12)}), bytes(12)),
    "overlap": image(header({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}), bytes(8)),
    "missing_bytes": image(header({"t": ok}), bytes(4)),
    "trailing_bytes": image(header({"t": ok}), bytes(9)),
    "huge_claim": image(header({"t": entry("U8", [2**40], 0, 2**40)}), bytes(8)),
    "metadata_not_object": image('{"__metadata__":"x"}'),
    "metadata_not_string": image('{"__metadata__":{"n":1}}'),
}

for folder, files in (("valid", valid), ("invalid", invalid)):
    (HERE / folder).mkdir(exist_ok=True)
    for name, content in files.items():
        (HERE / folder / (name + ".safetensors")).write_bytes(content)
