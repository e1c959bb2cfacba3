#!/usr/bin/env python3
"""Python client scenario against a running gormic-gateway in --sandbox mode.

The client code is generated at run time from the repository's proto/ with
grpcio-tools (the standard protoc rules), into interop/python/gen/ (ignored by
git), exactly as a client team would generate it:

    python -m grpc_tools.protoc -I proto --python_out=gen --pyi_out=gen \
        --grpc_python_out=gen proto/gormic/om/v1/invoices.proto

`google/api/annotations.proto` is compiled from proto/ but its Python module
comes from googleapis-common-protos (a grpcio-status dependency), like for any
googleapis-annotated proto.

Scenario: create -> update -> close -> send with value checks; a failing call
(the same update again) whose gRPC code and google.rpc.ErrorInfo are decoded
from grpc-status-details-bin; a call with a generous deadline that succeeds
and one with an already-expired deadline that fails with DEADLINE_EXCEEDED.

Usage: scenario.py HOST:PORT   (run by interop/run.sh)
"""

from __future__ import annotations

import datetime
import importlib.resources
import os
import sys
import uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GEN = os.path.join(ROOT, "interop", "python", "gen")
PROTO = "gormic/om/v1/invoices.proto"


def generate() -> None:
    """Generates the Python modules of our proto into GEN."""
    from grpc_tools import protoc

    os.makedirs(GEN, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{os.path.join(ROOT, 'proto')}",
        f"-I{well_known}",
        f"--python_out={GEN}",
        f"--pyi_out={GEN}",
        f"--grpc_python_out={GEN}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed: {' '.join(args)}")


generate()
sys.path.insert(0, GEN)

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from gormic.om.v1 import invoices_pb2 as pb  # noqa: E402
from gormic.om.v1 import invoices_pb2_grpc as pb_grpc  # noqa: E402

UPSTREAM_DOMAIN = "om.gormic.com"
FAILURES: list[str] = []


def check(condition: bool, what: str) -> None:
    print(("  ok    " if condition else "  FAIL  ") + what)
    if not condition:
        FAILURES.append(what)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call (grpc-status-details-bin)."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def main(target: str) -> int:
    # A fresh organization per run: the sandbox keeps state per organization-id.
    organization = f"interop-python-{uuid.uuid4().hex[:12]}"
    metadata = (
        ("api-key", "sk_test_interop_python"),
        ("organization-id", organization),
        ("x-request-id", f"py-{uuid.uuid4()}"),
    )
    print(f"python client: {target}, organization-id {organization}")

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb_grpc.InvoiceServiceStub(channel)

        created = stub.CreateInvoice(
            pb.CreateInvoiceRequest(order_id="ord-ready", type=pb.INVOICE_TYPE_STANDARD),
            metadata=metadata,
            timeout=10,
        )
        invoice_id = created.id
        check(invoice_id.startswith("inv-"), f"CreateInvoice returns an id: {invoice_id!r}")
        check(created.meta.request_id != "", f"meta.request_id is set: {created.meta.request_id!r}")

        update = pb.UpdateInvoiceRequest(
            invoice_id=invoice_id,
            order_id="ord-ready",
            apply_expires_at="2030-01-31T00:00:00Z",
        )
        updated = stub.UpdateInvoice(update, metadata=metadata, timeout=10)
        check(updated.success is True, "UpdateInvoice success is true")

        # The failing call: the same update again changes nothing.
        try:
            stub.UpdateInvoice(update, metadata=metadata, timeout=10)
            check(False, "repeated UpdateInvoice fails")
        except grpc.RpcError as error:
            check(
                error.code() == grpc.StatusCode.FAILED_PRECONDITION,
                f"repeated UpdateInvoice is FAILED_PRECONDITION: {error.code()}",
            )
            info = error_info(error)
            check(info is not None, "grpc-status-details-bin carries a google.rpc.ErrorInfo")
            if info is not None:
                check(info.reason == "NO_CHANGES", f"ErrorInfo.reason is NO_CHANGES: {info.reason!r}")
                check(info.domain == UPSTREAM_DOMAIN, f"ErrorInfo.domain is {UPSTREAM_DOMAIN}: {info.domain!r}")
                check(
                    info.metadata.get("upstream_code") == "NoChanges",
                    f"metadata.upstream_code is NoChanges: {dict(info.metadata)}",
                )
                check(info.metadata.get("http_status") == "400", "metadata.http_status is 400")

        closed = stub.CloseInvoice(
            pb.CloseInvoiceRequest(invoice_id=invoice_id), metadata=metadata, timeout=10
        )
        check(closed.invoice_number > 0, f"CloseInvoice assigns a number: {closed.invoice_number}")
        check(closed.invoice_source != "", f"invoice_source is set: {closed.invoice_source!r}")
        try:
            at = datetime.datetime.fromisoformat(closed.invoiced_at.replace("Z", "+00:00"))
            check(at.tzinfo is not None, f"invoiced_at is RFC 3339: {closed.invoiced_at!r}")
        except ValueError:
            check(False, f"invoiced_at is RFC 3339: {closed.invoiced_at!r}")

        sent = stub.SendInvoice(
            pb.SendInvoiceRequest(invoice_id=invoice_id), metadata=metadata, timeout=10
        )
        check(sent.success is True, "SendInvoice success is true")
        check(sent.HasField("message_id") and sent.message_id != "", f"message_id is set: {sent.message_id!r}")

        # Deadlines: a generous one succeeds, an already-expired one cannot.
        second = stub.CreateInvoice(
            pb.CreateInvoiceRequest(order_id="ord-ready"), metadata=metadata, timeout=30
        )
        check(second.id.startswith("inv-") and second.id != invoice_id, "CreateInvoice within a 30 s deadline succeeds")
        # timeout=-1: a deadline that passed a second ago. (A tiny positive
        # timeout races with a loopback round trip of well under 1 ms, and
        # grpcio 1.85 treats timeout=0 as no deadline on a warm channel.)
        try:
            stub.CloseInvoice(
                pb.CloseInvoiceRequest(invoice_id=second.id), metadata=metadata, timeout=-1
            )
            check(False, "a call whose deadline has passed fails")
        except grpc.RpcError as error:
            check(
                error.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                f"an expired deadline gives DEADLINE_EXCEEDED: {error.code()}",
            )

    if FAILURES:
        print(f"python client: {len(FAILURES)} check(s) failed")
        return 1
    print("python client: all checks passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: scenario.py HOST:PORT")
    sys.exit(main(sys.argv[1]))
