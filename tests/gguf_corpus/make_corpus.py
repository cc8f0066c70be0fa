#!/usr/bin/env python3
"""Writes the GGUF corpus replayed by ctest (gguf.corpus) and used as the fuzzer's seeds: valid/
files must be accepted, invalid/ files rejected (one per validation rule of docs/gguf.md). Built
byte by byte from the format's definition (ggml docs/gguf.md), not by bitnet's writer. The files
are committed; rerun this script only to change the corpus."""
import pathlib
import struct

HERE = pathlib.Path(__file__).parent
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def s(text):
    data = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(data)) + data


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def tensor(name, ne, ttype, offset):
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne) + \
        struct.pack("<IQ", ttype, offset)


def gguf(kvs=(), tensors=(), data=b"", version=3, alignment=32, pad=True):
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    if tensors and pad:
        head += bytes((alignment - len(head) % alignment) % alignment)
    return head + data


def padded(data, alignment=32):
    return data + bytes((alignment - len(data) % alignment) % alignment)


# One TQ2_0 block: every weight 0 (code 1: bytes 0x55) but weight 0 = +1, d = fp16 1.0 (0x3c00).
TQ2 = bytes([0x56]) + bytes([0x55] * 63) + struct.pack("<H", 0x3C00)
# One TQ1_0 block: all zero weights (qs 128, qh 127), d = 0.5.
TQ1 = bytes([128] * 48) + bytes([127] * 4) + struct.pack("<H", 0x3800)
# I2_S 1 x 128: all zero weights (0x55), float32 d = 0.25, 28 zero bytes.
I2S = bytes([0x55] * 32) + struct.pack("<f", 0.25) + bytes(28)
# Q2_0 (64 weights): fp16 d first, 4 codes a byte from the low bits; all zero (0x55) but weight 0 = +1.
Q2 = struct.pack("<H", 0x3C00) + bytes([0x56]) + bytes([0x55] * 15)
# PQ2_0 (128 weights, PrismML): Q2_0's codec; all zero, d = 0.5.
PQ2 = struct.pack("<H", 0x3800) + bytes([0x55] * 32)
# PTQ1_0 (128 weights, PrismML): qs[24] (0x80: five zero trits), qh[2] (0x7f), fp16 d = 0.25.
PTQ1 = bytes([0x80] * 24) + bytes([0x7F] * 2) + struct.pack("<H", 0x3400)


def hadamard_kvs(version=1, transform="normalized-sylvester-walsh-hadamard", extra=()):
    """PrismML's declaration of a Hadamard rotation of block 128 with explicit signs for width 128."""
    return [kv("prism.hadamard.version", U32, struct.pack("<I", version)),
            kv("prism.hadamard.block_size", U32, struct.pack("<I", 128)),
            kv("prism.hadamard.transform", STR, s(transform)),
            kv("prism.hadamard.axis", STR, s("input-last-dimension")),
            kv("prism.hadamard.sign_mode", STR, s("explicit")),
            kv("prism.hadamard.weight_names", ARR, struct.pack("<IQ", STR, 1) + s("w")),
            kv("prism.hadamard.sign_widths", ARR, struct.pack("<IQ", I32, 1) + struct.pack("<i", 128)),
            kv("prism.hadamard.sign_values", ARR, struct.pack("<IQ", I32, 128) + struct.pack("<128i", *([1, -1] * 64))),
            ] + list(extra)


ALL_KV = [
    kv("u8", U8, b"\x07"), kv("i8", I8, b"\xff"), kv("u16", U16, struct.pack("<H", 9)),
    kv("i16", I16, struct.pack("<h", -9)), kv("u32", U32, struct.pack("<I", 9)), kv("i32", I32, struct.pack("<i", -9)),
    kv("f32", F32, struct.pack("<f", 1.5)), kv("bool", BOOL, b"\x01"), kv("str", STR, s("caf\u00e9")),
    kv("u64", U64, struct.pack("<Q", 9)), kv("i64", I64, struct.pack("<q", -9)), kv("f64", F64, struct.pack("<d", 0.1)),
    kv("tokens", ARR, struct.pack("<IQ", STR, 3) + s("<s>") + s("") + s("\u2581the")),
    kv("nested", ARR, struct.pack("<IQ", ARR, 2) + struct.pack("<IQ", I32, 1) + struct.pack("<i", 5) +
       struct.pack("<IQ", STR, 1) + s("x")),
]

valid = {
    "empty": gguf(),
    "version2": gguf(version=2),
    "all_value_types": gguf(ALL_KV),
    "ternary_tensors": gguf([kv("general.architecture", STR, s("llama"))],
                            [tensor("tq2", [256, 1], 35, 0), tensor("tq1", [256, 1], 34, 96),
                             tensor("i2s", [128, 1], 36, 160), tensor("norm", [4], 0, 224), tensor("h", [2, 2], 1, 256)],
                            padded(TQ2) + padded(TQ1) + padded(I2S) + padded(struct.pack("<4f", 1, 2, 3, 4)) +
                            struct.pack("<4H", 0x3C00, 0x4000, 0x4200, 0x4400)),
    "alignment_64": gguf([kv("general.alignment", U32, struct.pack("<I", 64))],
                         [tensor("a", [3], 24, 0), tensor("b", [1], 24, 64)], padded(b"\x01\x02\x03", 64) + b"\x04",
                         alignment=64),
    "tq2_code_3": gguf([], [tensor("w", [256, 1], 35, 0)], bytes([0x57]) + TQ2[1:]),  # opens; decoding refuses
    "unequal_scales": gguf([], [tensor("w", [512, 1], 35, 0)], TQ2 + TQ2[:64] + struct.pack("<H", 0x3800)),
    "zero_size": gguf([], [tensor("z", [0, 3], 0, 0), tensor("f", [1], 0, 0)], struct.pack("<f", 1)),
    # Group-scaled types, each 2 blocks a row with unequal d.
    "group_scaled": gguf([], [tensor("q2", [128, 1], 42, 0), tensor("pq2", [256, 1], 142, 64),
                              tensor("ptq1", [256, 1], 143, 160)],
                         padded(Q2 + Q2[:1] + b"\x38" + Q2[2:]) + padded(PQ2 + b"\x00\x3c" + PQ2[2:]) +
                         PTQ1 + PTQ1[:26] + struct.pack("<H", 0x3800)),
    "q2_code_3": gguf([], [tensor("w", [64, 1], 42, 0)], Q2[:2] + bytes([0x57]) + Q2[3:]),  # +2: raw only
    "hadamard_declared": gguf(hadamard_kvs(), [tensor("w", [128, 1], 143, 0)], PTQ1),
}
one_t = lambda t, data=bytes(64): gguf([], [t], data)
invalid = {
    "empty_file": b"",
    "bad_magic": b"GGML" + struct.pack("<IQQ", 3, 0, 0),
    "version_1": gguf(version=1),
    "version_big_endian": gguf(version=0x03000000),
    "truncated_counts": gguf()[:20],
    "kv_count_huge": b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 60) + bytes(64),
    "tensor_count_huge": b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0) + bytes(64),
    "empty_key": gguf([kv("", U8, b"\x01")]) + bytes(8),
    "duplicate_key": gguf([kv("a", U8, b"\x01"), kv("a", U8, b"\x02")]),
    "key_not_utf8": gguf([kv(b"a\xc3", U8, b"\x01")]),
    "value_type_13": gguf([kv("a", 13, bytes(16))]),
    "bool_2": gguf([kv("a", BOOL, b"\x02")]),
    "truncated_value": gguf([kv("a", U32, b"\x01\x02")]),
    "string_length_overflow": gguf([kv("a", STR, struct.pack("<Q", (1 << 64) - 1) + bytes(8))]),
    "array_count_huge": gguf([kv("a", ARR, struct.pack("<IQ", U32, 1 << 62) + bytes(16))]),
    "array_element_type_14": gguf([kv("a", ARR, struct.pack("<IQ", 14, 0) + bytes(8))]),
    "arrays_too_deep": gguf([kv("a", ARR, struct.pack("<IQ", ARR, 1) * 8 + struct.pack("<IQ", U8, 0) + bytes(64))]),
    "alignment_u64": gguf([kv("general.alignment", U64, struct.pack("<Q", 32))]),
    "alignment_not_power_of_2": gguf([kv("general.alignment", U32, struct.pack("<I", 24))]),
    "tensor_name_empty": one_t(tensor("", [4], 0, 0)),
    "tensor_name_64_bytes": one_t(tensor("x" * 64, [4], 0, 0)),
    "tensor_name_twice": gguf([], [tensor("t", [4], 0, 0), tensor("t", [4], 0, 32)], bytes(64)),
    "five_dims": one_t(tensor("t", [1, 1, 1, 1, 1], 0, 0)),
    "dim_over_int64": one_t(tensor("t", [1 << 63], 0, 0)),
    "dims_product_overflow": one_t(tensor("t", [1 << 32, 1 << 32], 0, 0)),
    "type_id_5": one_t(tensor("t", [4], 5, 0)),
    "type_id_99": one_t(tensor("t", [4], 99, 0)),
    "row_not_whole_blocks": one_t(tensor("t", [100, 2], 35, 0)),
    "byte_size_overflow": one_t(tensor("t", [1 << 62], 28, 0)),
    "offset_not_aligned": one_t(tensor("t", [4], 0, 16)),
    "tensor_past_end": one_t(tensor("t", [17], 0, 0)),
    "offset_huge": one_t(tensor("t", [4], 0, (1 << 64) - 32)),
    "overlap": gguf([], [tensor("a", [16], 0, 0), tensor("b", [4], 0, 32)], bytes(64)),
    "data_section_missing": gguf([], [tensor("t", [4], 0, 0)], pad=False),
    "pq2_row_not_whole_blocks": one_t(tensor("t", [100, 1], 142, 0)),
    "ptq1_past_end": gguf([], [tensor("t", [128, 2], 143, 0)], PTQ1 + PTQ1[:27]),
    "type_id_144": one_t(tensor("t", [128], 144, 0)),
    "hadamard_version_2": gguf(hadamard_kvs(version=2), [tensor("w", [128, 1], 143, 0)], PTQ1),
    "hadamard_unknown_transform": gguf(hadamard_kvs(transform="dct"), [tensor("w", [128, 1], 143, 0)], PTQ1),
    "hadamard_unknown_key": gguf(hadamard_kvs(extra=[kv("prism.hadamard.scale", F32, struct.pack("<f", 2))]),
                                 [tensor("w", [128, 1], 143, 0)], PTQ1),
}

for folder, files in (("valid", valid), ("invalid", invalid)):
    (HERE / folder).mkdir(exist_ok=True)
    for name, data in files.items():
        (HERE / folder / (name + ".gguf")).write_bytes(data)
