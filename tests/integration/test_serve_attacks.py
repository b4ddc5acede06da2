"""Attacks on the public ``coach serve`` (a subprocess on loopback): hostile frames over an
authenticated session, SIGTERM mid-stream, tampered plan directories, a man in the middle that
changes one byte, and a flood of idle connections. Outcomes only (counts, equality, exit
codes, files), never durations; every wait is bounded."""

import contextlib
import hashlib
import hmac
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

from coach_fx.runtime.codec import entries_to_output, payload_to_entries
from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.end import EndWorker
from coach_fx.runtime.links.base import PeerGone
from coach_fx.runtime.links.tcp import IntegrityError, connect
from coach_fx.runtime.policy import StaticPolicy
from coach_fx.runtime.wire import FLAG_CONTROL, FLAG_ERROR, FLAG_RESULT, VERSION, Entry, decode, encode

# the installed console script: run from the source folder, "python -m coach_fx.cli" would
# import the source tree, which has no coach_fx.passes (pyproject maps it from passes/)
COACH = str(Path(sys.executable).with_name("coach"))

TOKEN = "attack-tests-shared-secret"   # >= 16 bytes: a shorter token is refused
#: Generous bound on any one wait (a busy CI host); the tests never assert on time.
WAIT_S = 60.0



@pytest.fixture(scope="module")
def plan(stem_head_split, tmp_path_factory):
    """(compiled model, eager model, an example input, a signed plan directory with the whole model)."""
    cm, m = stem_head_split
    x = torch.randn(1, 3, 8, 8)
    d = tmp_path_factory.mktemp("plan")
    cm.save(d, whole=True, key=TOKEN)
    return cm, m, x, d


# ------------------------------------------------------------------ the server process
def until(cond, timeout: float = WAIT_S) -> bool:
    """Poll ``cond`` (work done by other threads or processes) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Serve:
    """``coach serve`` as a subprocess. Its output is collected by a thread: a full pipe would
    block the server, and the tests wait for lines it prints (listening, draining)."""

    def __init__(self, plan_dir, port, *extra: str) -> None:
        # the token from the environment, never on a command line (any user can read it in ps)
        self.proc = subprocess.Popen(
            [COACH, "serve", str(plan_dir), "--port", str(port), "--timeout", "10", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "COACH_TOKEN": TOKEN})
        self.lines: list[str] = []
        self._eof = False
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    @property
    def output(self) -> str:
        with self._cv:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = WAIT_S) -> bool:
        """Whether the server printed ``text`` (False if it exited or ``timeout`` passed first)."""
        seen = lambda: any(text in line for line in self.lines)  # noqa: E731
        with self._cv:
            self._cv.wait_for(lambda: seen() or self._eof, timeout)
            return seen()

    def listening(self) -> None:
        # printed once the cloud half is loaded and the port is bound
        assert self.wait_for("coach serve: cloud half"), self.output

    def terminate(self, timeout: float = WAIT_S) -> int:
        """SIGTERM; its exit code (it must exit within ``timeout``). ``coach serve`` handles
        SIGTERM from before it prints its listening line."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = WAIT_S) -> int:
        """Its exit code, once it has exited and all its output is read."""
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT_S)
        self._reader.join(WAIT_S)


@contextlib.contextmanager
def serving(plan_dir, port, *extra: str):
    """A listening server, killed on the way out whatever happened."""
    srv = Serve(plan_dir, port, *extra)
    try:
        srv.listening()
        yield srv
    finally:
        srv.kill()


def served_count(output: str) -> int:
    """Requests answered, from the summary line ``coach serve`` prints when it stops."""
    found = re.search(r"served (\d+) requests", output)
    assert found, output
    return int(found.group(1))


def expect_close(m, frames, results, atol=1e-2):
    """Exactly one result per frame, in order, each the eager model's (8-bit crossing)."""
    assert len(results) == len(frames)
    with torch.no_grad():
        for f, r in zip(frames, results):
            assert isinstance(r, torch.Tensor), r
            assert torch.allclose(r, m(f), atol=atol)


def end_worker(cm, ep, **config):
    return EndWorker(ep, cm.out_spec, StaticPolicy(cm.end_module, cm.boundary),
                     StreamConfig(timeout_s=10, **config))


def stream(cm, port, frames):
    end = end_worker(cm, connect("127.0.0.1", port, TOKEN, 10.0))
    try:
        results, _ = end.run(frames)
    finally:
        end.close()
    return results


# ------------------------------------------------------------------ 1. hostile frames
REQ = 41   # the request id of the real message every mutation starts from

# message header "<4sHHQHHI": magic 0, version 4, flags 6, request id 8, plan id 16,
# entry count 18, crc32 20; the first entry header follows at 24 ("<BBBB8IfiQI")
_H = 24
_KIND, _DTYPE, _BITS, _RANK, _DIMS, _SCALE, _ZERO, _NBYTES, _CODEC = 0, 1, 2, 3, 4, 36, 40, 44, 52


def _fix_crc(buf: bytearray) -> bytes:
    """Recompute the checksum, so that the decoder's field checks (not the CRC) must catch it."""
    struct.pack_into("<I", buf, 20, zlib.crc32(bytes(buf[_H:])))
    return bytes(buf)


def _entry(good: bytes, off: int, fmt: str, *value) -> bytes:
    buf = bytearray(good)
    struct.pack_into(fmt, buf, _H + off, *value)
    return _fix_crc(buf)


def _header(good: bytes, off: int, fmt: str, value) -> bytes:
    buf = bytearray(good)
    struct.pack_into(fmt, buf, off, value)   # the message header is not under the CRC
    return bytes(buf)


def _flip(good: bytes, at: int) -> bytes:
    buf = bytearray(good)
    buf[at] ^= 0x10
    return bytes(buf)


def mutations(cm, x) -> list[tuple[str, bytes, str]]:
    """28 (name, frame, expected outcome): "error" (its own error reply, the session goes on),
    "dropped" (the session ends unread: the frame is longer than any legal request), or
    "answered" (a correct result: the mutation left a request the server accepts)."""
    with torch.no_grad():
        entries = payload_to_entries(cm.boundary, cm.end_module(x))
        good = bytes(encode(REQ, entries, 0, 0))
        (c,) = cm.boundary.crossings
        # a well-formed request for another plan: half the channels of this plan's crossing
        other = Entry.quantized(torch.zeros(4 * 8 * 8, dtype=torch.uint8), 0.01, 0, c.bits,
                                (1, 4, 8, 8), c.dtype)
    assert c.kind == "quant" and c.bits == 8 and tuple(c.shape) == (1, 8, 8, 8)
    # deflate codes of 5000 zeros in the bytes of a 512-byte packed tensor: a decompression bomb
    bomb = zlib.compress(bytes(5000))
    bomb_msg = bytearray(good[:_H + 56] + bomb)
    struct.pack_into("<QI", bomb_msg, _H + _NBYTES, len(bomb), 1)
    cases = [
        ("empty message", b"", "error"),
        ("truncated inside the message header", good[:10], "error"),
        ("truncated inside the entry header", good[:_H + 30], "error"),
        ("truncated inside the payload", good[:-100], "error"),
        ("one bit flipped in the header (checksum)", _flip(good, 21), "error"),
        ("one bit flipped in the payload", _flip(good, _H + 56 + 100), "error"),
        ("bad magic", b"EVIL" + good[4:], "error"),
        (f"wire version {VERSION + 1}", _header(good, 4, "<H", VERSION + 1), "error"),
        *[(f"bits {b}", _entry(good, _BITS, "<B", b), "error") for b in (0, 1, 7, 33, 255)],
        ("int32 dtype claim", _entry(good, _DTYPE, "<B", 7), "error"),
        ("rank 9", _entry(good, _RANK, "<B", 9), "error"),
        ("NaN scale", _entry(good, _SCALE, "<f", math.nan), "error"),
        ("+inf scale", _entry(good, _SCALE, "<f", math.inf), "error"),
        ("-1 scale", _entry(good, _SCALE, "<f", -1.0), "error"),
        ("zero scale", _entry(good, _SCALE, "<f", 0.0), "error"),
        ("3e38 scale", _entry(good, _SCALE, "<f", 3e38), "error"),
        ("huge dims", _entry(good, _DIMS, "<4I", *(0xFFFFFFFF,) * 4), "error"),
        ("entry count 0", _header(good, 18, "<H", 0), "error"),
        ("entry count 300", _header(good, 18, "<H", 300), "error"),
        ("unknown plan id", _header(good, 16, "<H", 7), "error"),
        ("a shape for another plan", bytes(encode(REQ, [other], 0, 0)), "error"),
        ("deflate bomb", _fix_crc(bomb_msg), "error"),
        # the only control request is close: a control flag on any other request is refused
        ("control flag without the close id", _header(good, 6, "<H", FLAG_CONTROL), "error"),
        # longer than the largest legal request of the plan: refused before it is read, which
        # ends the session (server.py: "a longer length prefix ends its session unread")
        ("extra trailing bytes", _fix_crc(bytearray(good + bytes(8))), "dropped"),
    ]
    assert len(cases) == 28 and len({n for n, _, _ in cases}) == 28
    return cases


def test_the_server_survives_28_mutated_frames_and_serves_the_next_good_request(plan, free_port):
    cm, m, x, d = plan
    cases = mutations(cm, x)
    with torch.no_grad():
        good = bytes(encode(REQ + 1, payload_to_entries(cm.boundary, cm.end_module(x)), 0, 0))
    outcome: dict[str, str] = {}
    replies = 0
    with serving(d, free_port) as srv:
        ep = connect("127.0.0.1", free_port, TOKEN, 10.0)
        try:
            for name, frame, _ in cases:
                ep.send(frame)
                try:
                    reply = ep.recv(10)
                except PeerGone:
                    # the session is over, not the server: a new end may connect
                    outcome[name] = "dropped"
                    ep.close()
                    ep = connect("127.0.0.1", free_port, TOKEN, 10.0)
                    continue
                replies += 1
                req, _, flags, entries = decode(reply)
                if flags & FLAG_ERROR:
                    # its own error reply: for its request, or request 0 when the header that
                    # names the request is unreadable
                    assert req in (REQ, 0), (name, req)
                    outcome[name] = "error"
                    text = bytes(entries[0].value().tolist()).decode(errors="replace")
                    print(f"{name:45s} -> error for request {req}: {text[:110]}")
                else:
                    outcome[name] = "answered"
                    print(f"{name:45s} -> answered request {req} (flags {flags})")
                    with torch.no_grad():   # an answer, then the right one
                        assert req == REQ and flags & FLAG_RESULT, (name, req, flags)
                        assert torch.allclose(entries_to_output(entries, cm.out_spec), m(x), atol=1e-2)
            # after all of them the session (or a fresh one) is served as if nothing happened
            ep.send(good)
            req, _, flags, entries = decode(ep.recv(10))
            replies += 1
        finally:
            ep.close()
        assert srv.proc.poll() is None, srv.output
        assert outcome == {name: want for name, _, want in cases}
        assert (req, flags & (FLAG_ERROR | FLAG_RESULT)) == (REQ + 1, FLAG_RESULT)
        with torch.no_grad():
            assert torch.allclose(entries_to_output(entries, cm.out_spec), m(x), atol=1e-2)
        assert srv.terminate() == 0, srv.output
    # every reply the server counts is one this end received: nothing was answered twice
    assert served_count(srv.output) == replies


# ------------------------------------------------------------------ 2. SIGTERM drains
class CountingPolicy(StaticPolicy):
    """The static policy, counting the results that came back from the cloud."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.from_cloud = 0

    def on_result(self, i, out, stats, audit) -> None:
        self.from_cloud += 1


def test_sigterm_drains_and_exits_0(plan, free_port):
    cm, m, _, d = plan
    frames = [torch.randn(1, 3, 8, 8) for _ in range(200)]
    termed = threading.Event()

    def camera():
        # the second half of the stream waits until the server has begun to drain: those
        # frames reach a server that no longer reads, so the fallback must answer them
        for i, f in enumerate(frames):
            if i == 100:
                termed.wait(WAIT_S)
            yield f

    with serving(d, free_port) as srv:
        policy = CountingPolicy(cm.end_module, cm.boundary)
        end = EndWorker(connect("127.0.0.1", free_port, TOKEN, 10.0), cm.out_spec, policy,
                        StreamConfig(timeout_s=10, fallback="local"), whole_model=m)
        got: dict = {}

        def run():
            try:
                got["results"], got["stats"] = end.run(camera())
            except BaseException as e:  # noqa: BLE001 - reported by the assertions below
                got["error"] = e

        t = threading.Thread(target=run)
        t.start()
        try:
            assert until(lambda: policy.from_cloud >= 20 or not t.is_alive())
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.wait_for("SIGTERM: draining"), srv.output
        finally:
            termed.set()
            t.join(2 * WAIT_S)
        assert not t.is_alive() and "error" not in got, got.get("error")
        rc = srv.wait()
    results, stats = got["results"], got["stats"]
    print(f"\nSIGTERM mid-stream: {len(results)} results, {stats.outcomes.fell_back} computed locally; "
          f"server: {srv.output.strip().splitlines()[-1]}")
    assert rc == 0, srv.output
    # the drain finished in time: "; drained" at the end of the summary
    assert srv.output.rstrip().endswith("; drained"), srv.output
    expect_close(m, frames, results)
    # the cloud answered what it had read; what came after the drain ran on the end
    assert stats.outcomes.fell_back >= 1 and stats.outcomes.failed == 0
    from_cloud = len(frames) - stats.outcomes.fell_back
    assert from_cloud >= 20
    # every cloud result the end used is a reply the server counted (a few replies may have
    # been lost with the socket when the end's sender saw the link go first)
    assert from_cloud <= served_count(srv.output)


def test_sigterm_right_after_the_listening_line_drains_an_idle_server(plan, free_port):
    _, _, _, d = plan
    # the handler is set before the line is printed; the summary follows the drain (twice:
    # each start is a fresh process, ~2.5 s)
    for _ in range(2):
        with serving(d, free_port) as srv:
            assert srv.terminate() == 0, srv.output
        assert srv.output.rstrip().endswith("; drained"), srv.output


# ------------------------------------------------------------------ 3. tampered plans
class Canary:
    """A pickle that, if anything ever unpickled it, would run a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


def _resign(d: Path, key: str | None) -> None:
    """Rewrite the manifest with the files' true SHA-256s, as an attacker who can write the
    directory would; signed with ``key`` (not the server's token), or unsigned when None."""
    doc = json.loads((d / "manifest.json").read_text())
    doc["sha256"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in doc["sha256"]}
    doc["bytes"] = {n: (d / n).stat().st_size for n in doc["sha256"]}
    doc.pop("hmac_sha256", None)
    if key is not None:
        body = json.dumps({"format": doc["format"], "sha256": doc["sha256"], "bytes": doc["bytes"]},
                          sort_keys=True).encode()
        doc["hmac_sha256"] = hmac.new(key.encode(), b"coach_fx manifest\0" + body, hashlib.sha256).hexdigest()
    (d / "manifest.json").write_text(json.dumps(doc, indent=1))


def _flip_byte(f: Path, at: int = 100) -> None:
    b = bytearray(f.read_bytes())
    b[at] ^= 0xFF
    f.write_bytes(bytes(b))


def test_tampered_plan_directories_are_refused_before_any_code_runs(plan, tmp_path, free_port):
    cm, m, _, d = plan
    canary = tmp_path / "CANARY"
    evil = pickle.dumps(Canary(canary))
    # the payload is live: unpickled, it does create its file (else the canary proves nothing)
    probe = tmp_path / "PROBE"
    pickle.loads(pickle.dumps(Canary(probe)))
    assert probe.exists()

    def planted(t: Path) -> None:
        (t / "cloud.pt2").write_bytes(evil)       # a file a careless loader might try
        (t / "cloud.tensors").write_bytes(evil)   # the weights replaced by the pickle

    def edit_plan(t: Path) -> None:
        doc = json.loads((t / "plan.json").read_text())
        doc["boundary"]["crossings"][0]["bits"] = 4
        (t / "plan.json").write_text(json.dumps(doc, indent=1))

    cases = {
        # (what is done to the copy, what the error must name)
        "pickles planted": (planted, r"cloud\.tensors.*SHA-256.*manifest\.json"),
        "one byte of cloud.tensors flipped": (lambda t: _flip_byte(t / "cloud.tensors"),
                                              r"cloud\.tensors.*SHA-256.*manifest\.json"),
        "hashes rewritten, hmac dropped": (lambda t: (planted(t), _resign(t, None)),
                                           r"manifest\.json is not signed"),
        "hashes rewritten, signed with another key": (
            lambda t: (planted(t), _resign(t, "the-attackers-own-token")),
            r"manifest\.json is not signed with this side's token"),
        "plan.json edited": (edit_plan, r"plan\.json.*SHA-256.*manifest\.json"),
    }
    for name, (tamper, names) in cases.items():
        t = tmp_path / re.sub(r"\W+", "_", name)
        shutil.copytree(d, t)
        tamper(t)
        r = subprocess.run([COACH, "serve", str(t), "--port", str(free_port), "--sessions", "1"],
                           capture_output=True, text=True, env={**os.environ, "COACH_TOKEN": TOKEN},
                           timeout=120)
        print(f"{name}: rc {r.returncode}: {r.stderr.strip()[:160]}")
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert re.search(names, r.stderr), (name, r.stderr)
        assert "cloud half" not in r.stdout, (name, r.stdout)   # it never got to serve
        assert not canary.exists(), name

    # the end side: the whole model for fallback="local" changed -> refused before it runs
    t = tmp_path / "model_tampered"
    shutil.copytree(d, t)
    _flip_byte(t / "model.tensors")
    r = subprocess.run([COACH, "run", str(t), "--port", str(free_port), "--fallback", "local",
                        "--synthetic", "2", "--timeout", "5"],
                       capture_output=True, text=True, env={**os.environ, "COACH_TOKEN": TOKEN}, timeout=120)
    print(f"coach run, model.tensors flipped: rc {r.returncode}: {r.stderr.strip()[:160]}")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert re.search(r"model\.tensors.*SHA-256.*manifest\.json", r.stderr), r.stderr

    # pickles planted beside an intact plan are not part of it: the server starts, serves,
    # and never reads (so never unpickles) them
    t = tmp_path / "planted_beside"
    shutil.copytree(d, t)
    (t / "cloud.pt2").write_bytes(evil)
    (t / "cloud.pt").write_bytes(evil)
    frames = [torch.randn(1, 3, 8, 8) for _ in range(3)]
    with serving(t, free_port) as srv:
        expect_close(m, frames, stream(cm, free_port, frames))
        assert srv.terminate() == 0, srv.output
    assert not canary.exists()


def test_a_signed_plan_that_cannot_run_ends_coach_serve_with_its_error(plan, tmp_path, free_port):
    """Signed with the token (as any end could): a crossing 1.5 GB large is refused before
    anything of that size is allocated; one the cloud half cannot take fails its warm-up. Either
    way ``coach serve`` exits 2 naming why, instead of listening and answering nothing."""
    cm, m, x, d = plan
    cases = {"a 1.5 GB crossing": ([1, 8, 7000, 7000], r"the wire carries at most"),
             "a crossing the half cannot take": ([1, 8, 9, 9], r"warming them up failed")}
    for name, (shape, names) in cases.items():
        t = tmp_path / re.sub(r"\W+", "_", name)
        shutil.copytree(d, t)
        meta = json.loads((t / "plan.json").read_text())
        meta["boundary"]["crossings"][0]["shape"] = shape
        (t / "plan.json").write_text(json.dumps(meta))
        _resign(t, TOKEN)
        r = subprocess.run([COACH, "serve", str(t), "--port", str(free_port)], capture_output=True, text=True,
                           env={**os.environ, "COACH_TOKEN": TOKEN}, timeout=120)
        print(f"{name}: rc {r.returncode}: {r.stderr.strip()[:200]}")
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert re.search(names, r.stderr), (name, r.stderr)
        assert "cloud half of" not in r.stdout, (name, r.stdout)   # it never listened


# ------------------------------------------------------------------ 4. a man in the middle
HANDSHAKE_DOWN = 8 + 2 + 32 + 32 + 8   # cloud -> end: hello, version, nonce; its proof; its verdict
HANDSHAKE_UP = 32 + 32             # end -> cloud: its nonce, then its proof
FRAME_LEN = 8                      # each frame: length, message, 16-byte tag


class FlipProxy:
    """Forwards one connection between an end and the server, flipping one byte inside the
    first message after the handshake in one direction ("down": to the end, "up": to the server)."""

    def __init__(self, upstream_port: int, direction: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port, self.direction = upstream_port, direction
        self.flipped = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(WAIT_S)
        end, _ = self.listener.accept()
        cloud = socket.create_connection(("127.0.0.1", self.upstream_port))
        down = HANDSHAKE_DOWN + FRAME_LEN + 30 if self.direction == "down" else None
        up = HANDSHAKE_UP + FRAME_LEN + 100 if self.direction == "up" else None
        for src, dst, at in ((cloud, end, down), (end, cloud, up)):
            t = threading.Thread(target=self._pump, args=(src, dst, at), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
        seen = 0
        try:
            while data := src.recv(65536):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data = bytearray(data)
                    data[flip_at - seen] ^= 0x01
                    self.flipped.set()
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):   # one side gone: so is the other
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for t in self.threads[1:]:
            t.join(WAIT_S)


def test_a_proxy_that_changes_a_byte_is_detected(plan, free_port):
    cm, m, x, d = plan
    frames = [torch.randn(1, 3, 8, 8) for _ in range(5)]
    with torch.no_grad():
        request = bytes(encode(0, payload_to_entries(cm.boundary, cm.end_module(x)), 0, 0))
    with serving(d, free_port) as srv:
        # to the end: its first result altered -> a loud IntegrityError, never a wrong answer
        proxy = FlipProxy(free_port, "down")
        end = end_worker(cm, connect("127.0.0.1", proxy.port, TOKEN, 10.0))
        try:
            with pytest.raises(IntegrityError):
                end.run(frames)
        finally:
            end.endpoint.close()
            proxy.close()
        assert proxy.flipped.is_set()

        # to the server: its first request altered -> the server ends that session
        proxy = FlipProxy(free_port, "up")
        ep = connect("127.0.0.1", proxy.port, TOKEN, 10.0)
        try:
            ep.send(request)
            with pytest.raises(PeerGone):
                ep.recv(10)
        finally:
            ep.close()
            proxy.close()
        assert proxy.flipped.is_set()

        # ... and only that one: a new end is served correctly
        expect_close(m, frames, stream(cm, free_port, frames))
        assert srv.proc.poll() is None, srv.output
        assert srv.terminate() == 0, srv.output


# ------------------------------------------------------------------ 5. idle connections
def test_one_silent_and_200_idle_connections_do_not_delay_a_real_end_s_handshake(plan, free_port):
    cm, m, _, d = plan
    frames = [torch.randn(1, 3, 8, 8) for _ in range(20)]
    with serving(d, free_port) as srv:
        # 127/8 is all loopback: other source addresses are other peers to the server
        silent = socket.create_connection(("127.0.0.1", free_port), source_address=("127.0.0.3", 0))
        idle = [socket.create_connection(("127.0.0.1", free_port), source_address=("127.0.0.2", 0))
                for _ in range(200)]
        try:
            t0 = time.perf_counter()
            ep = connect("127.0.0.1", free_port, TOKEN, 10.0)
            handshake_s = time.perf_counter() - t0   # recorded, not asserted
            end = end_worker(cm, ep)
            try:
                results, _ = end.run(frames)
            finally:
                end.close()
            expect_close(m, frames, results)
            # every idle connection was answered (a hello to prove a token, or "busy"): none
            # was left hanging in the accept loop
            answers = []
            for s in idle:
                s.settimeout(WAIT_S)
                answers.append(s.recv(8))
            busy = sum(a == b"COCHBUSY" for a in answers)
            hello = sum(a == b"COCHAUTH" for a in answers)
            print(f"\nreal end's handshake behind 1 silent + 200 idle connections: "
                  f"{handshake_s * 1e3:.1f} ms; idle ones: {hello} got a hello, {busy} were turned away")
            assert busy + hello == 200 and busy >= 1
        finally:
            for s in (silent, *idle):
                s.close()
        assert srv.proc.poll() is None, srv.output
        assert srv.terminate() == 0, srv.output
