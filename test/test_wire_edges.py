"""The edges of the wire thread, found by a review that attacked it: heads that end where
civetweb would not end them, clients that half-close and stop reading, binary packets
whose attachments never come, Engine.IO 3 sids borrowed from name_list, and running out
of file descriptors. Each test performs the attack and checks what the server must do.
"""
import json
import os
import socket
import time

import requests

from conftest import BINARY, Polling, SourceAddress, server_has_read, wait_until
from rawws import Closed, RawWS
from test_metrics import scrape, value
from test_socketio import joined
from test_slow_clients import newcomer_joins


def server_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_head_ending_lf_cr_lf_holds_no_worker(make_server):
    # "\n\r\n" is not the end of a head for civetweb (only "\n\n" and "\r\n\r\n" are). Were
    # the wire thread to hand such a head over, each would hold a worker for civetweb's
    # 10 s request timeout: four of them lock every newcomer out.
    s = make_server("--threads", "4", "--header-timeout", "3000")
    held = []
    for i in range(8):
        c = socket.create_connection((s.host, s.port), source_address=(f"127.0.3.{i + 1}", 0))
        c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\nHost: x\n\r\n")
        held.append(c)
    assert wait_until(lambda: server_has_read(*held), timeout=10)
    newcomer_joins(s, within=2.5)  # (held workers: about 10 s)
    for c in held:  # to them the head is unfinished: the header timeout ends it
        c.settimeout(10)
        assert c.recv(100).startswith(b"HTTP/1.1 408")
        c.close()


def test_a_tab_in_a_header_is_whitespace(server):
    # HTTP allows tabs around header values; civetweb refuses any control character in a
    # head, Node takes them. The wire thread turns them into spaces.
    c = socket.create_connection((server.host, server.port))
    c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost:\tx\r\n"
              b"Accept:\t*/*\t\r\n\r\n")
    c.settimeout(5)
    assert c.recv(4096).startswith(b"HTTP/1.1 200")
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")
    assert c.recv(4096).startswith(b"HTTP/1.1 400")


def test_a_half_closed_client_that_does_not_read_costs_no_cpu(server):
    # 400 pipelined requests for the page, a tiny receive buffer, never read, then FIN:
    # the answer waits for room to be written. Watching for the client's hang-up there
    # (level-triggered) would wake the wire thread in a loop until the write deadline.
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect((server.host, server.port))
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
    time.sleep(0.5)  # (not a verdict: the answers fill the socket buffers meanwhile)
    c.shutdown(socket.SHUT_WR)
    before = server_cpu_seconds(server.proc.pid)
    time.sleep(2)
    spent = server_cpu_seconds(server.proc.pid) - before
    assert spent < 0.5, f"the server spent {spent:.2f} s of CPU in 2 s waiting to write"
    c.close()


PENDING = '452-["msg",{"a":{"_placeholder":true,"num":0},"b":{"_placeholder":true,"num":1}}]'


def test_attachments_that_never_come_count_against_the_memory_budget(make_server):
    # Each attacker announces two attachments, sends one of 1 MB and never the other:
    # what it holds is in no queue. It must count as input still arriving (half the
    # budget at most), and the server must never pass --max-memory.
    s = make_server("--max-memory", "16M", "--flood-limit", "0")
    bystander = joined(s, source="127.0.4.1")
    attackers, refused = [], 0
    for i in range(30):
        ws = joined(s, source=f"127.0.5.{i + 1}")
        ws.send_text(PENDING)
        ws.send_binary(b"\0" * 1000000)
        attackers.append(ws)
        text = scrape(s.url)
        assert value(text, "chatroom_memory_bytes") <= 16 << 20
    for ws in attackers:  # the ones past half the budget were closed
        try:
            while True:
                ws.recv_message(timeout=0.2)
        except (Closed, OSError):
            refused += 1
        except (TimeoutError, socket.timeout):
            pass
    assert refused >= 15, f"only {refused} of 30 attackers were refused"
    assert value(scrape(s.url), "chatroom_memory_bytes") <= 8.5 * (1 << 20)
    bystander.send_text('42["msg",{"action":"send msg","msg":"still here"}]')
    newcomer_joins(s)


def test_a_binary_packet_must_be_whole_within_a_heartbeat(make_server):
    # Its attachments must follow within ping interval + timeout (here 1.5 s), or the
    # client is dropped, even one that answers every ping.
    s = make_server("--ping-interval", "500", "--ping-timeout", "1000")
    ws = joined(s)
    ws.send_text(PENDING)
    ws.send_binary(b"attachment 0 of 2")
    start = time.monotonic()
    while time.monotonic() < start + 10:
        try:
            message = ws.recv_message(timeout=5)
        except (Closed, OSError):
            break
        if message == "2":
            ws.send_text("3")
    took = time.monotonic() - start
    assert 1.2 < took < 5, took


def eio3_payload(*packets):
    return "".join(f"{len(p.encode('utf-16-le')) // 2}:{p}" for p in packets)


def eio3_packets(text):
    out = []
    while text:
        n, _, rest = text.partition(":")
        units, i = int(n), 0  # the length counts UTF-16 code units
        while units > 0:
            units -= 2 if ord(rest[i]) > 0xFFFF else 1
            i += 1
        out.append(rest[:i])
        text = rest[i:]
    return out


def test_an_engineio3_sid_from_name_list_is_useless_elsewhere(server):
    # A socket.io-client 2 member's Socket.IO id is its Engine.IO sid, and name_list shows
    # it to everyone: from another address that sid is unknown.
    victim = Polling(server, eio=3, handshake=False, source="127.0.6.1")
    packets = eio3_packets(victim.get().text)  # v3 clients are in "/" at once
    victim.sid = json.loads(packets[0][1:])["sid"]
    login = next(json.loads(p[2:]) for p in packets if p.startswith('42["msg"'))
    listed = login[1]["name_list"][-1][1]
    assert listed == victim.sid
    thief = requests.Session()
    thief.mount("http://", SourceAddress("127.0.7.1"))
    for method, body in (("POST", eio3_payload('42["msg",{"msg":"not mine"}]')), ("GET", None)):
        r = thief.request(method, server.eio, params={"EIO": "3", "transport": "polling",
                                                      "sid": listed}, data=body, timeout=5)
        assert r.status_code == 400 and r.json()["code"] == 1, (method, r.text)
    ws = RawWS(server.host, server.port, f"/socket.io/?EIO=3&transport=websocket&sid={listed}",
               source="127.0.7.1")
    assert ws.status == 400
    # and from its own address it goes on as before
    victim.post(eio3_payload('42["msg",{"action":"send msg","msg":"mine"}]'))
    got = eio3_packets(victim.get().text)
    assert any("mine" in p for p in got) and not any("not mine" in p for p in got), got


def test_out_of_descriptors_the_oldest_waiting_head_makes_way(make_server):
    # 190 descriptors in all: 300 half heads from 60 addresses use them up; a newcomer
    # must not wait for a header timeout but take the place of the oldest.
    s = make_server("--max-clients", "20", binary="prlimit",
                    prefix=("--nofile=190:190", BINARY))
    held = []
    for i in range(300):
        try:
            c = socket.create_connection((s.host, s.port), timeout=2,
                                         source_address=(f"127.0.{8 + i // 5}.{1 + i % 5}", 0))
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            held.append(c)
        except OSError:
            pass
    newcomer_joins(s, within=5.0)  # (without eviction: the 60 s header timeout)
    for c in held:
        c.close()


def test_a_refused_post_does_not_look_under_way(server):
    # The wire thread marks a POST under way as soon as its head names a session (a second
    # one at once is an overlap, which ends the session). One the worker then refuses --
    # a wrong protocol version, here -- must not stay marked.
    p = Polling(server)
    refused = socket.create_connection((server.host, server.port))
    refused.sendall(f"POST /socket.io/?EIO=5&transport=polling&sid={p.sid} HTTP/1.1\r\n"
                    f"Host: x\r\nContent-Length: 2\r\n\r\n40".encode())
    refused.settimeout(5)
    assert refused.recv(4096).startswith(b"HTTP/1.1 400")  # and its connection stays open
    assert p.post("40").text == "ok"
    assert any(x.startswith("40{") for x in p.packets())


def test_the_recovery_ring_is_emptied_when_nobody_can_ask_for_it(server):
    # Events are kept for members that asked for recovery; once the last of them is gone
    # for good, what was kept must go too (it counts against the memory budget).
    base = value(scrape(server.url), "chatroom_memory_bytes")
    keeper = joined(server, auth='{"recovery":true}')
    talker = joined(server)
    for i in range(40):
        talker.send_text('42["msg",{"action":"send msg","msg":"%s"}]' % ("x" * 10000))
    # (the messages are taken in as they arrive: the ring fills up shortly)
    assert wait_until(lambda: value(scrape(server.url), "chatroom_memory_bytes") > base + 300000), \
        value(scrape(server.url), "chatroom_memory_bytes")
    keeper.send_text("41")  # an explicit disconnect: gone for good
    talker.close()
    assert wait_until(lambda: value(scrape(server.url), "chatroom_memory_bytes") < base + 50000), \
        value(scrape(server.url), "chatroom_memory_bytes")
