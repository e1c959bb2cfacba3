"""Request bodies for the benchmark: the gRPC frames the gateway receives and
the REST bodies the upstream receives, derived from the proto so that a
renumbered field or a moved route fails here instead of benchmarking the
wrong request.

The protobuf encoder below handles just the two wire types these messages
need (varint and length-delimited); the expected bytes are spelled out next
to each message and checked at start-up.
"""

import json
import re
from pathlib import Path

PROTO = Path("proto/gormic/om/v1/invoices.proto")

ORDER_ID = "ord-1"
INVOICE_ID = "inv-1"
INVOICE_TYPE_REST = "standard"


class ProtoMismatch(Exception):
    """The proto no longer says what the benchmark assumes."""


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string_field(number, text):
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint_field(number, value):
    return _varint(number << 3 | 0) + _varint(value)


def grpc_frame(message):
    """gRPC length-prefixed message: flag 0 (uncompressed), u32 big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _message_body(proto_text, name):
    match = re.search(r"\bmessage\s+" + name + r"\s*\{(.*?)\n\}", proto_text, re.S)
    if not match:
        raise ProtoMismatch(f"{PROTO}: message {name} not found")
    return match.group(1)


def _field_number(proto_text, message, field):
    body = _message_body(proto_text, message)
    match = re.search(r"^\s*(?:optional\s+)?\w+\s+" + field + r"\s*=\s*(\d+)\s*;", body, re.M)
    if not match:
        raise ProtoMismatch(f"{PROTO}: field {message}.{field} not found")
    return int(match.group(1))


def _enum_value(proto_text, name):
    match = re.search(r"^\s*" + name + r"\s*=\s*(\d+)\s*;", proto_text, re.M)
    if not match:
        raise ProtoMismatch(f"{PROTO}: enum value {name} not found")
    return int(match.group(1))


def _http_rule(proto_text, rpc):
    match = re.search(r"\brpc\s+" + rpc + r"\s*\(.*?option\s*\(google\.api\.http\)\s*=\s*\{((?:[^{}\"]|\"[^\"]*\")*)\}", proto_text, re.S)
    if not match:
        raise ProtoMismatch(f"{PROTO}: rpc {rpc} or its google.api.http option not found")
    rule = re.search(r"\b(get|post|put|patch|delete)\s*:\s*\"([^\"]+)\"", match.group(1))
    if not rule:
        raise ProtoMismatch(f"{PROTO}: rpc {rpc} has no HTTP verb in its google.api.http option")
    return rule.group(1).upper(), rule.group(2)


def build(root):
    """Everything each RPC needs, per path. Raises ProtoMismatch when the proto
    disagrees with the fixed upstream in upstream.conf.in."""
    proto_text = (Path(root) / PROTO).read_text()
    package = re.search(r"^\s*package\s+([\w.]+)\s*;", proto_text, re.M)
    if not package or package.group(1) != "gormic.om.v1":
        raise ProtoMismatch(f"{PROTO}: package is not gormic.om.v1")
    if not re.search(r"\bservice\s+InvoiceService\s*\{", proto_text):
        raise ProtoMismatch(f"{PROTO}: service InvoiceService not found")

    # CreateInvoiceRequest{order_id: "ord-1", type: INVOICE_TYPE_STANDARD}
    #   0a 05 6f 72 64 2d 31   field 1 (order_id), wire type 2, length 5, "ord-1"
    #   10 01                  field 2 (type), wire type 0, value 1 (STANDARD)
    # gRPC frame: 00 00 00 00 09 + those 9 bytes.
    create = _string_field(_field_number(proto_text, "CreateInvoiceRequest", "order_id"), ORDER_ID) + _varint_field(
        _field_number(proto_text, "CreateInvoiceRequest", "type"),
        _enum_value(proto_text, "INVOICE_TYPE_STANDARD"),
    )
    # CloseInvoiceRequest{invoice_id: "inv-1"}
    #   0a 05 69 6e 76 2d 31   field 1 (invoice_id), wire type 2, length 5, "inv-1"
    # gRPC frame: 00 00 00 00 07 + those 7 bytes.
    close = _string_field(_field_number(proto_text, "CloseInvoiceRequest", "invoice_id"), INVOICE_ID)
    expected = {
        "create": bytes.fromhex("0a056f72642d311001"),
        "close": bytes.fromhex("0a05696e762d31"),
    }
    if create != expected["create"] or close != expected["close"]:
        # The encoder follows the proto; the upstream's canned answers and the
        # comments above assume these exact numbers.
        raise ProtoMismatch(
            f"{PROTO}: field numbers changed (CreateInvoiceRequest encodes as {create.hex()}, "
            f"CloseInvoiceRequest as {close.hex()}); update scripts/bench.d/payloads.py"
        )

    create_rule = _http_rule(proto_text, "CreateInvoice")
    close_rule = _http_rule(proto_text, "CloseInvoice")
    if create_rule != ("POST", "/v1/om/invoices"):
        raise ProtoMismatch(f"{PROTO}: CreateInvoice maps to {create_rule}, upstream.conf.in serves POST /v1/om/invoices")
    if close_rule != ("PATCH", "/v1/om/invoices/{invoice_id}/close"):
        raise ProtoMismatch(
            f"{PROTO}: CloseInvoice maps to {close_rule}, upstream.conf.in serves PATCH /v1/om/invoices/{{id}}/close"
        )

    return {
        "CreateInvoice": {
            "grpc_path": "/gormic.om.v1.InvoiceService/CreateInvoice",
            "grpc_body": grpc_frame(create),
            "rest_method": "POST",
            "rest_path": "/v1/om/invoices",
            # What the gateway sends upstream for this call, so the REST paths
            # carry the same request.
            "rest_body": json.dumps(
                {"params": {"orderId": ORDER_ID, "type": INVOICE_TYPE_REST}}, separators=(",", ":")
            ).encode(),
        },
        "CloseInvoice": {
            "grpc_path": "/gormic.om.v1.InvoiceService/CloseInvoice",
            "grpc_body": grpc_frame(close),
            "rest_method": "PATCH",
            "rest_path": f"/v1/om/invoices/{INVOICE_ID}/close",
            "rest_body": None,
        },
    }
