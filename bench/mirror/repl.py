#!/usr/bin/env python3
"""repl.py — small helpers for the mirror benchmarks: free ports and nbdmirror's replication status.

Usage:
  repl.py ports N                          N distinct free TCP ports on 127.0.0.1 (20000-32767), one line
  repl.py status HTTP [EXPORT]             the export's entry of GET HTTP/v1/status .replication.exports[]
                                           as one JSON line (exit 1 when the node does not answer)
  repl.py wait-up HTTP|PORT [--timeout S] [--pid PID]
                                           wait until GET HTTP/v1/status answers, or (a port number) until
                                           127.0.0.1:PORT accepts a TCP connection; exit 1 on timeout, or at
                                           once when process PID has exited. A node opens its NBD port last,
                                           when everything else is ready.
  repl.py wait-sync PRIMARY_HTTP SECONDARY_HTTP [EXPORT] [--timeout S] [--poll S] [--min-connects N]
                   [--pids PID,PID]
                                           poll both nodes until the pair is in sync: the primary's
                                           link.state == "connected" and outOfSync.blocks == 0, the
                                           secondary's disk == "UpToDate" (and, with --min-connects, the
                                           primary's link.connects >= N). Prints one JSON line:
                                             ok, in_sync_at (epoch s, first poll that saw it in sync),
                                             resync_started_at (epoch s, the server's link.resync.startedAt
                                             when a poll caught the resync running, else null),
                                             states (the primary's link states seen, in order, with times),
                                             polls, primary, secondary (the last status of each).
                                           Exit 0 in sync, 1 timed out or (--pids) a node's process exited
                                           (the JSON says what was last seen, and "exited").
"""
import json
import random
import socket
import sys
import time
import urllib.request


def opt(args, name, default, conv=float):
    if name in args:
        i = args.index(name)
        v = args[i + 1]
        del args[i:i + 2]
        return conv(v)
    return default


def free_ports(n):
    """Distinct ports below the ephemeral range, each free for a bind on 127.0.0.1 right now."""
    got, held = [], []
    for _ in range(1000):
        if len(got) == n:
            break
        p = random.randint(20000, 32767)
        if p in got:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            s.close()
            continue
        held.append(s)
        got.append(p)
    for s in held:
        s.close()
    if len(got) < n:
        sys.exit("repl.py: no free ports")
    return got


def get_status(http, export="disk0", timeout=2.0):
    """The export's replication entry, or None when the node does not answer."""
    try:
        with urllib.request.urlopen(http.rstrip("/") + "/v1/status", timeout=timeout) as r:
            body = json.load(r)
    except Exception:
        return None
    for e in (body.get("replication") or {}).get("exports") or []:
        if e.get("name") == export:
            return e
    return {}


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def in_sync(p, s, min_connects):
    if not p or not s:
        return False
    link = p.get("link") or {}
    return (link.get("state") == "connected" and (p.get("outOfSync") or {}).get("blocks") == 0
            and s.get("disk") == "UpToDate" and (link.get("connects") or 0) >= min_connects)


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd = args.pop(0)
    if cmd == "ports":
        print(" ".join(map(str, free_ports(int(args[0])))))
    elif cmd == "status":
        st = get_status(args[0], args[1] if len(args) > 1 else "disk0")
        if st is None:
            sys.exit(1)
        print(json.dumps(st))
    elif cmd == "wait-up":
        timeout = opt(args, "--timeout", 20.0)
        pid = opt(args, "--pid", None, int)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if args[0].isdigit():
                if port_open(args[0]):
                    return
            elif get_status(args[0], timeout=1.0) is not None:
                return
            if pid is not None and not alive(pid):
                sys.exit(f"repl.py: process {pid} exited before {args[0]} answered")
            time.sleep(0.05)
        sys.exit(f"repl.py: {args[0]} did not answer within {timeout:g} s")
    elif cmd == "wait-sync":
        timeout = opt(args, "--timeout", 60.0)
        poll = opt(args, "--poll", 0.05)
        min_connects = opt(args, "--min-connects", 0, int)
        pids = [int(p) for p in opt(args, "--pids", "", str).split(",") if p]
        primary, secondary = args[0], args[1]
        export = args[2] if len(args) > 2 else "disk0"
        deadline = time.time() + timeout
        states, started, polls, p, s = [], None, 0, None, None
        ok, exited = False, []
        while True:
            p = get_status(primary, export)
            s = get_status(secondary, export)
            now = time.time()
            polls += 1
            link = (p or {}).get("link") or {}
            st = link.get("state")
            if not states or states[-1][1] != st:
                states.append([round(now, 3), st])
            rs = link.get("resync")
            if rs and rs.get("startedAt") and started is None:
                started = rs["startedAt"] / 1000.0
            if in_sync(p, s, min_connects):
                ok = True
                break
            exited = [pid for pid in pids if not alive(pid)]
            if now >= deadline or exited:
                break
            time.sleep(poll)
        print(json.dumps({"ok": ok, "exited": exited, "in_sync_at": round(now, 4) if ok else None, "resync_started_at": started,
                          "states": states, "polls": polls, "primary": p, "secondary": s}))
        sys.exit(0 if ok else 1)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
