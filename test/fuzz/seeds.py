#!/usr/bin/python3
"""Writes the seed corpus of each fuzz target into test/fuzz/corpus/TARGET/, a handful of
meaningful inputs each (what the target's top comment says its input is). Inputs that the
fuzzers found (crash-*, regression inputs) are kept there too, but not written here.

    python3 test/fuzz/seeds.py
"""
import base64
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def utf16_units(text):
    return len(text.encode("utf-16-le")) // 2


# ---- json: a JSON text ----------------------------------------------------------------
write("json", "event", '["msg",{"text":"hi","username":"x","n":1.5e3}]')
write("json", "escapes", '"tab\\t quote\\" \\u00e9 \\ud83e\\udd8a"')
write("json", "object", '{"a":[true,false,null],"user\\u006eame":"y","b":{"c":-0.5}}')
write("json", "deep", "[" * 64 + "]" * 64)
write("json", "too-deep", "[" * 65 + "]" * 65)

# ---- payload: a mode byte (value % 3: 0 protocol 4, 1 protocol 3, 2 protocol 3's binary
# body), then a long-poll body
write("payload", "v4-packets", b"0" + '40{"token":"x"}\x1e42["msg","hi"]\x1e3\x1e6'.encode())
write("payload", "v4-binary", b"0" + b'451-["msg",{"_placeholder":true,"num":0}]\x1ebAQID\x1ebAA==')


def v3(*packets):
    return "".join(f"{utf16_units(p)}:{p}" for p in packets)


write("payload", "v3-packets", b"1" + v3("2probe", '42["msg","\u00e9\U0001F98A"]', "6").encode())
write("payload", "v3-base64", b"1" + v3("40", "b4" + base64.b64encode(b"\x00\xff\x10").decode()).encode())
write("payload", "v3-binary-body",
      b"2" + b"\x00\x02\xff" + b"40" + b"\x01\x04\xff\x04\x01\x02\x03" + b"\x00\x01\xff2")

# ---- websocket: a byte (bit 0: protocol 3; bits 1-3: maxPayload, one of 125, 126, 1000,
# 65535, 65536, 100000, 1 MiB, 200; bit 4: round trip), a seed for how reads are cut, then
# client bytes (raw) or messages (round trip: header byte, length byte, data)


def frame(opcode, payload, fin=True, mask=b"\x12\x34\x56\x78", length=None):
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


write("websocket", "raw-v4-messages", bytes([2 << 1, 7]) + frame(1, b'42["msg","hi"]') +
      frame(9, b"ping") + frame(2, b"\x00\x01", fin=False) + frame(9, b"") +
      frame(0, b"\x02\x03") + frame(8, b"\x03\xe8bye"))
write("websocket", "raw-v3-binary", bytes([1 | 2 << 1, 3]) + frame(2, b"\x04\xde\xad") +
      frame(1, b"2probe") + frame(2, b"\x02ping"))
write("websocket", "raw-64bit-length", bytes([3 << 1, 1]) + frame(2, b"\x00" * 8, length=1 << 63))
write("websocket", "raw-16bit-over", bytes([0 << 1, 9]) + frame(1, b"4" + b"x" * 200))
write("websocket", "raw-bad-frames", bytes([2 << 1, 5]) + frame(1, b"4a", fin=False) +
      frame(1, b"4b") + frame(0, b"c"))
write("websocket", "roundtrip-v4", bytes([0x10 | 3 << 1, 11]) + bytes([0, 5]) + b"hello" +
      bytes([1 | 2 << 1 | 8, 4]) + b"\x00\x01\x02\x03" + bytes([16 | 6, 250]) + b"y" * 250)
write("websocket", "roundtrip-v3-over", bytes([0x10 | 1 | 7 << 1, 2]) + bytes([1, 3]) + b"abc" +
      bytes([16 | 8, 200]) + b"z" * 200 + bytes([0, 1]) + b"!")

# ---- socketio: a byte (bit 0: protocol 3, bit 1: b64, bit 2: a member away, whose pid
# "PID" stands for), then the fuzzed client's packets, separated by 0x1e: "b" + raw bytes
# is a binary attachment, anything else a text packet
V4, V3 = b"\x00", b"\x01"
write("socketio", "v4-chat", V4 + "\x1e".join([
    '40{"presence":"delta"}', '42["msg",{"text":"hi","username":"me","n":[1,2]}]',
    '4217["msg","plain",3]', '3', '41']).encode())
write("socketio", "v4-binary", V4 + b"\x1e".join([
    b"40", b'451-9["msg",{"img":{"_placeholder":true,"num":0}}]', b"b\x00\xff\x10",
    b'452-["msg",{"_placeholder":true,"num":1},{"_placeholder":true,"num":0}]', b"b\x00", b"bxy"]))
write("socketio", "v4-namespaces", V4 + "\x1e".join([
    '40/admin,{}', '40{"recovery":true}', '40', '42/admin,["msg",1]']).encode())
write("socketio", "v3-chat", V3 + "\x1e".join([
    '2probe', '42["msg",{"t":"\u00e9\U0001F98A"}]', '41/,', '40/?x=1,', '42["history"]']).encode())
write("socketio", "v3-b64-attachment", b"\x03" + b"\x1e".join([
    b'451-["msg",{"_placeholder":true,"num":0}]', b"b\x04\x05", b'4512["msg",[]]', b"1"]))
# bit 2: a member is away (recoverable), "PID" its pid: the client comes back as it
write("socketio", "v4-recover", b"\x04" + "\x1e".join([
    '40{"pid":"PID","offset":"0"}', '42["msg",{"text":"back"}]', '42["history"]']).encode())
write("socketio", "v4-recover-no-offset", b"\x06" + b"\x1e".join([
    b'40{"pid":"PID"}', b'451-["msg",{"_placeholder":true,"num":0}]', b"b\x01"]))
write("socketio", "malformed", V4 + "\x1e".join([
    '40', '42["connect"]', '42[1]', '44{"message":"x"}', '45-["msg"]']).encode())

# ---- base64: any bytes, encoded and decoded; and decoded as text
write("base64", "text", "SGVsbG8sIHdvcmxkIQ==")
write("base64", "url-alphabet", "-_-_AQ")
write("base64", "bad-length", "QUJDRA=====")
write("base64", "binary", bytes(range(256)))

# ---- utf8: any bytes
write("utf8", "mixed", "a\u00e9\u20ac\U0001F98A\u0800\uffff\U00010000\U0010FFFF")
write("utf8", "surrogate", b"\xed\xa0\x80\xed\xbf\xbf")
write("utf8", "overlong", b"\xc0\x80\xe0\x80\x80\xf0\x80\x80\x80")
write("utf8", "above-max", b"\xf4\x90\x80\x80\xf5\x80\x80\x80")
write("utf8", "truncated", b"ok \xf0\x9f\xa6")

# ---- http: what a client sends, a request head and maybe more
SID = "FUZZsidFUZZsidFUZZ_-"  # the sid of the session fuzz_http.c opens
write("http", "poll-get", f"GET /socket.io/?EIO=4&transport=polling&sid={SID}&t=x HTTP/1.1\r\n"
      "Host: a\r\nConnection: keep-alive\r\n\r\n")
write("http", "poll-post", f"POST /socket.io/?EIO=3&transport=polling&b64=1&sid={SID} HTTP/1.1\r\n"
      "Host: a\r\nContent-Length: 8\r\nContent-Type: text/plain\r\n\r\n6:2probe")
write("http", "websocket", "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: a\r\n"
      "Upgrade: websocket\r\nConnection: Upgrade, keep-alive\r\nSec-WebSocket-Version: 13\r\n\r\n")
write("http", "lf-only", f"GET /?sid={SID}&transport=pol%6Cing HTTP/1.0\nConnection: close\n\n")
write("http", "framing", "POST /socket.io/ HTTP/1.1\r\nContent-Length: 5 \r\ncontent-length:5\r\n"
      "Transfer-Encoding: chunked\r\n\r\n")
write("http", "big-length", "POST / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n")
