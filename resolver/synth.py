"""Answers moat makes up itself, built from the query's bytes (no message objects).

* policy answers: NXDOMAIN and NODATA (with an SOA so downstream caches keep them for the
  rule's TTL), SINKHOLE (A/AAAA with the configured addresses, NODATA for other types) and
  Local-Data; each carries an Extended DNS Error (RFC 8914, 15 "Blocked") naming the
  category and source when the client sent EDNS;
* the RFC 8482 minimal answer to qtype ANY: one HINFO "RFC8482" record.
"""

from __future__ import annotations

import socket
import struct

from policy.rules import Action
from policy.verdict import Verdict

from . import wire

_SOA_OWNER = wire.text_to_wire_name("rpz.moat")
_SOA_FIXED = wire.text_to_wire_name("localhost") + wire.text_to_wire_name("nobody.invalid")
_SOA_TIMERS = struct.Struct("!IIIII")


def _soa(serial: int, ttl: int) -> tuple[bytes, int, int, bytes]:
    rdata = _SOA_FIXED + _SOA_TIMERS.pack(serial & 0xFFFFFFFF, 3600, 600, 86400, ttl)
    return (_SOA_OWNER, wire.TYPE_SOA, ttl, rdata)


def ede_for(verdict: Verdict) -> bytes:
    family = f", family {verdict.family}" if verdict.family else ""
    text = f"moat: {verdict.category}{family} (source {verdict.source})"
    return wire.ede_option(wire.EDE_BLOCKED, text)


def _addresses(addrs: tuple[str, ...], family: int) -> list[bytes]:
    return [socket.inet_pton(family, a) for a in addrs]


def blocked_answer(query: wire.Query, verdict: Verdict) -> bytes:
    """The answer for a verdict whose action rewrites it (not DROP/PASSTHRU/LOG_ONLY)."""
    action = verdict.action
    ttl = verdict.ttl
    ede = ede_for(verdict) if query.edns else b""
    if action == Action.NXDOMAIN:
        return wire.build_answer(query, wire.NXDOMAIN, [],
                                 [_soa(verdict.policy_version, ttl)], ede=ede)
    answers: list[tuple[int, int, bytes]] = []
    qtype = query.qtype
    if action == Action.SINKHOLE:
        if qtype == wire.TYPE_A:
            answers = [(wire.TYPE_A, ttl, a)
                       for a in _addresses(verdict.sinkhole_v4, socket.AF_INET)]
        elif qtype == wire.TYPE_AAAA:
            answers = [(wire.TYPE_AAAA, ttl, a)
                       for a in _addresses(verdict.sinkhole_v6, socket.AF_INET6)]
    elif action == Action.LOCAL_DATA:
        for rec in verdict.local_data:
            if rec.rtype == qtype or qtype == wire.TYPE_ANY:
                rdata = rec.rdata
                if rec.wildcard_target is not None:
                    rdata = wildcard_cname_target(query.qname, rec.wildcard_target)
                answers.append((rec.rtype, rec.ttl if rec.ttl is not None else ttl, rdata))
    if answers:
        return wire.build_answer(query, wire.NOERROR, answers, ede=ede)
    # NODATA, and everything a rewrite has no records for
    return wire.build_answer(query, wire.NOERROR, [], [_soa(verdict.policy_version, ttl)],
                             ede=ede)


def wildcard_cname_target(qname: str, garden: str) -> bytes:
    """``CNAME *.garden.example.``: the query name is put in place of the ``*``."""
    target = f"{qname}.{garden}" if qname else garden
    try:
        return wire.text_to_wire_name(target)
    except ValueError:  # too long with the query name in front: point at the garden itself
        return wire.text_to_wire_name(garden)


def cname_target(query: wire.Query, verdict: Verdict) -> tuple[bytes, int] | None:
    """For Local-Data with a CNAME and a query for another type: (target wire, ttl) to chase."""
    if query.qtype == wire.TYPE_CNAME:
        return None
    for rec in verdict.local_data:
        if rec.rtype == wire.TYPE_CNAME:
            rdata = rec.rdata
            if rec.wildcard_target is not None:
                rdata = wildcard_cname_target(query.qname, rec.wildcard_target)
            return rdata, rec.ttl if rec.ttl is not None else verdict.ttl
    return None


_NAME_RDATA = (wire.TYPE_CNAME, wire.TYPE_DNAME, wire.TYPE_NS, wire.TYPE_PTR)


def chase_answer(query: wire.Query, target: bytes, ttl: int, data: bytes, msg: wire.Message,
                 verdict: Verdict) -> bytes:
    """A walled-garden answer: our CNAME to ``target``, then the upstream's answer records
    for the target (owner names and names inside RDATA decompressed, since the upstream's
    compression pointers mean nothing in our message)."""
    answers: list[tuple[bytes, int, int, bytes]] = []
    for rec in msg.records:
        if rec.section != 1:
            continue
        rdata = data[rec.rdata_offset:rec.end]
        if rec.rtype in _NAME_RDATA:
            rdata = wire.read_name(data, rec.rdata_offset)[0]
        elif rec.rtype == wire.TYPE_MX:
            rdata = rdata[:2] + wire.read_name(data, rec.rdata_offset + 2)[0]
        elif rec.rtype in (wire.TYPE_SOA, wire.TYPE_SRV):
            continue
        answers.append((rec.name, rec.rtype, rec.ttl, rdata))
    body = bytearray(b"\xc0\x0c" + wire.RR_FIXED.pack(wire.TYPE_CNAME, wire.CLASS_IN, ttl,
                                                       len(target)) + target)
    for owner, rtype, rttl, rdata in answers:
        body += owner + wire.RR_FIXED.pack(rtype, wire.CLASS_IN, rttl, len(rdata)) + rdata
    additional = wire.opt_record(wire.UDP_PAYLOAD, query.do, 0,
                                 ede_for(verdict)) if query.edns else b""
    rcode = msg.rcode if msg.rcode in (wire.NOERROR, wire.NXDOMAIN) else wire.NOERROR
    flags = wire.response_flags(query.flags, rcode)
    return wire.HEADER.pack(query.id, flags, 1, 1 + len(answers), 0,
                            1 if additional else 0) + query.question + bytes(body) + additional


def any_answer(query: wire.Query) -> bytes:
    """RFC 8482 section 4.2: answer ANY with one synthesised HINFO record."""
    rdata = b"\x07RFC8482\x00"
    return wire.build_answer(query, wire.NOERROR, [(wire.TYPE_HINFO, 3600, rdata)])
