#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_srv_parse: DNS answers as servers write
them (compressed SRV answers with additional A/AAAA, NXDOMAIN and NODATA with
an SOA, CNAME chains, A and AAAA answers, 60 records, TC, OPT) and broken
ones (pointer loops, wrong counts, cut short). Run once from this directory;
the output is committed."""
import os
import socket
import struct
import sys

SRV, A, AAAA, CNAME, SOA, TXT, OPT = 33, 1, 28, 5, 6, 16, 41


def name(text):
    out = b""
    for label in text.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def ptr(off):
    return struct.pack(">H", 0xC000 | off)


def header(qid=0x1234, flags=0x8180, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def question(qname, qtype):
    return name(qname) + struct.pack(">HH", qtype, 1)


def rr(owner, rtype, ttl, rdata, klass=1):
    o = owner if isinstance(owner, bytes) else name(owner)
    return o + struct.pack(">HHIH", rtype, klass, ttl, len(rdata)) + rdata


def srv_rdata(prio, weight, port, target):
    t = target if isinstance(target, bytes) else name(target)
    return struct.pack(">HHH", prio, weight, port) + t


def a(addr):
    return socket.inet_pton(socket.AF_INET, addr)


def aaaa(addr):
    return socket.inet_pton(socket.AF_INET6, addr)


def soa(zone, minimum):
    return name("ns." + zone) + name("admin." + zone) + struct.pack(">IIIII", 1, 60, 60, 600, minimum)


Q = "_tw._tcp.example.test"


def packets():
    out = {}
    q = question(Q, SRV)
    # plain: two records, additional A and AAAA, weight 0, two priorities
    body = (rr(Q, SRV, 30, srv_rdata(0, 10, 8443, "p1.example.test"))
            + rr(Q, SRV, 20, srv_rdata(1, 0, 8444, "p2.example.test"))
            + rr("p1.example.test", A, 12, a("10.0.0.1"))
            + rr("p2.example.test", AAAA, 40, aaaa("fd00::2")))
    out["plain"] = header(an=2, ar=2) + q + body
    # compressed as servers write it: owners point at the question, targets
    # share the zone's suffix, additional owners point into the SRV rdata
    p = header(an=2, ar=2) + q
    zone = 12 + 4 + 5
    rd1 = struct.pack(">HHH", 0, 1, 8443) + b"\x02p1" + ptr(zone)
    p += ptr(12) + struct.pack(">HHIH", SRV, 1, 60, len(rd1))
    t1 = len(p) + 6
    p += rd1
    rd2 = struct.pack(">HHH", 0, 1, 8444) + b"\x02p2" + ptr(zone)
    p += ptr(12) + struct.pack(">HHIH", SRV, 1, 60, len(rd2))
    t2 = len(p) + 6
    p += rd2
    p += ptr(t1) + struct.pack(">HHIH", A, 1, 60, 4) + a("10.0.0.1")
    p += ptr(t2) + struct.pack(">HHIH", AAAA, 1, 60, 16) + aaaa("fd00::2")
    out["compressed"] = p
    out["nxdomain"] = header(flags=0x8183, ns=1) + q + rr("example.test", SOA, 60, soa("example.test", 5))
    out["nodata"] = (header(an=1, ns=1) + q + rr(Q, TXT, 1, b"\x01x")
                     + rr("example.test", SOA, 3, soa("example.test", 600)))
    out["servfail"] = header(flags=0x8182) + q
    out["truncated_tc"] = header(flags=0x8380) + q
    out["target_root"] = header(an=1) + q + rr(Q, SRV, 9, srv_rdata(0, 0, 0, b"\0"))
    out["cname_chain"] = (header(an=2) + q + rr(Q, CNAME, 4, name("_real._tcp.example.test"))
                          + rr("_real._tcp.example.test", SRV, 50, srv_rdata(0, 1, 2, "p1.example.test")))
    out["opt_and_chaos"] = (header(an=1, ar=2) + q + rr(Q, SRV, 7, srv_rdata(0, 1, 80, "p1.example.test"))
                            + rr(b"\0", OPT, 0, b"", klass=1232)
                            + rr("p1.example.test", A, 1, a("1.1.1.1"), klass=3))
    big = b"".join(rr(Q, SRV, 1, srv_rdata(0, 1, 9000 + i, "h%d.example.test" % i)) for i in range(1, 61))
    big += b"".join(rr("h%d.example.test" % i, A, 1, a("127.0.1.%d" % i)) for i in range(1, 61))
    out["sixty"] = header(an=60, ar=60) + q + big
    qa = question("host.example.test", A)
    out["a_cname"] = (header(an=3) + qa + rr("host.example.test", CNAME, 9, name("real.example.test"))
                      + rr("real.example.test", A, 20, a("192.0.2.7"))
                      + rr("real.example.test", A, 20, a("192.0.2.5")))
    out["aaaa"] = header(an=1) + question("host.example.test", AAAA) + rr("host.example.test", AAAA, 5, aaaa("2001:db8::1"))
    # broken ones
    out["loop_self"] = header(an=1) + q + ptr(len(header()) + len(q)) + struct.pack(">HHIH", SRV, 1, 1, 7) + b"\0\0\0\0\0\1\0"
    lab = len(header()) + len(q)
    out["loop_label"] = header(an=1) + q + b"\x01a" + ptr(lab) + struct.pack(">HHIH", SRV, 1, 1, 7) + b"\0\0\0\0\0\1\0"
    out["counts_too_many"] = header(an=3, ar=2) + q + body
    out["counts_too_few"] = header(an=1, ar=2) + q + body
    out["cut_short"] = (header(an=2, ar=2) + q + body)[:-7]
    out["a_wrong_length"] = header(ar=1) + q + rr("p1.example.test", A, 1, b"\1\2\3\4\5")
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    d = os.path.join(here, "corpus", "srv_parse")
    os.makedirs(d, exist_ok=True)
    for k, v in packets().items():
        with open(os.path.join(d, k), "wb") as f:
            f.write(v)
    print("wrote %d inputs to %s" % (len(packets()), d), file=sys.stderr)


if __name__ == "__main__":
    main()
