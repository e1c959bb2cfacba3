#!/usr/bin/env node
// Node client scenario against a running gormic-gateway in --sandbox mode.
//
// @grpc/proto-loader loads the repository's proto/ at run time (no code
// generation); @grpc/grpc-js makes the calls; protobufjs decodes the
// `grpc-status-details-bin` trailer as google.rpc.Status with the subset of
// google/rpc protos in ./proto.
//
// Scenario: create -> update -> close -> send with value checks; a failing
// call (the same update again) whose gRPC code and google.rpc.ErrorInfo are
// checked; a call with a generous deadline that succeeds and one with an
// already-expired deadline that fails with DEADLINE_EXCEEDED.
//
// Usage: node scenario.js HOST:PORT   (run by interop/run.sh)
'use strict';

const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const UPSTREAM_DOMAIN = 'om.gormic.com';

const definition = protoLoader.loadSync('gormic/om/v1/invoices.proto', {
  includeDirs: [path.join(ROOT, 'proto')],
  keepCase: true, // field names as in the proto: invoice_id, order_id, ...
  longs: String, // int64 invoice_number as a string: no precision loss
  enums: String,
  defaults: true,
  oneofs: true,
});
const om = grpc.loadPackageDefinition(definition).gormic.om.v1;

const rpc = protobuf.loadSync([
  path.join(__dirname, 'proto/google/rpc/status.proto'),
  path.join(__dirname, 'proto/google/rpc/error_details.proto'),
]);
const Status = rpc.lookupType('google.rpc.Status');
const ErrorInfo = rpc.lookupType('google.rpc.ErrorInfo');

const failures = [];
function check(condition, what) {
  console.log((condition ? '  ok    ' : '  FAIL  ') + what);
  if (!condition) failures.push(what);
}

/** Promise-returning unary call. */
function call(client, method, request, metadata, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** The ErrorInfo in the grpc-status-details-bin trailer of a failed call. */
function errorInfo(error) {
  const [bin] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return undefined;
  const status = Status.decode(bin);
  const any = status.details.find((d) => d.type_url === 'type.googleapis.com/google.rpc.ErrorInfo');
  return any ? ErrorInfo.toObject(ErrorInfo.decode(any.value)) : undefined;
}

function inSeconds(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

async function main(target) {
  // A fresh organization per run: the sandbox keeps state per organization-id.
  const organization = `interop-node-${crypto.randomUUID().slice(0, 12)}`;
  const metadata = new grpc.Metadata();
  metadata.set('api-key', 'sk_test_interop_node');
  metadata.set('organization-id', organization);
  metadata.set('x-request-id', `node-${crypto.randomUUID()}`);
  console.log(`node client: ${target}, organization-id ${organization}`);

  const client = new om.InvoiceService(target, grpc.credentials.createInsecure());
  await new Promise((resolve, reject) =>
    client.waitForReady(inSeconds(10), (error) => (error ? reject(error) : resolve())),
  );

  const created = await call(client, 'CreateInvoice',
    { order_id: 'ord-ready', type: 'INVOICE_TYPE_STANDARD' }, metadata, inSeconds(10));
  const invoiceId = created.id;
  check(invoiceId.startsWith('inv-'), `CreateInvoice returns an id: ${invoiceId}`);
  check(created.meta.request_id !== '', `meta.request_id is set: ${created.meta.request_id}`);

  const update = {
    invoice_id: invoiceId,
    order_id: 'ord-ready',
    apply_expires_at: '2030-01-31T00:00:00Z',
  };
  const updated = await call(client, 'UpdateInvoice', update, metadata, inSeconds(10));
  check(updated.success === true, 'UpdateInvoice success is true');

  // The failing call: the same update again changes nothing.
  try {
    await call(client, 'UpdateInvoice', update, metadata, inSeconds(10));
    check(false, 'repeated UpdateInvoice fails');
  } catch (error) {
    check(error.code === grpc.status.FAILED_PRECONDITION,
      `repeated UpdateInvoice is FAILED_PRECONDITION: ${error.code}`);
    const info = errorInfo(error);
    check(info !== undefined, 'grpc-status-details-bin carries a google.rpc.ErrorInfo');
    if (info) {
      check(info.reason === 'NO_CHANGES', `ErrorInfo.reason is NO_CHANGES: ${info.reason}`);
      check(info.domain === UPSTREAM_DOMAIN, `ErrorInfo.domain is ${UPSTREAM_DOMAIN}: ${info.domain}`);
      check(info.metadata.upstream_code === 'NoChanges',
        `metadata.upstream_code is NoChanges: ${JSON.stringify(info.metadata)}`);
      check(info.metadata.http_status === '400', 'metadata.http_status is 400');
    }
  }

  const closed = await call(client, 'CloseInvoice', { invoice_id: invoiceId }, metadata, inSeconds(10));
  check(/^[1-9][0-9]*$/.test(closed.invoice_number),
    `CloseInvoice assigns a number: ${closed.invoice_number}`);
  check(closed.invoice_source !== '', `invoice_source is set: ${closed.invoice_source}`);
  check(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/.test(closed.invoiced_at) &&
    !Number.isNaN(Date.parse(closed.invoiced_at)), `invoiced_at is RFC 3339: ${closed.invoiced_at}`);

  const sent = await call(client, 'SendInvoice', { invoice_id: invoiceId }, metadata, inSeconds(10));
  check(sent.success === true, 'SendInvoice success is true');
  check(typeof sent.message_id === 'string' && sent.message_id !== '',
    `message_id is set: ${sent.message_id}`);

  // Deadlines: a generous one succeeds, an already-expired one cannot.
  const second = await call(client, 'CreateInvoice', { order_id: 'ord-ready' }, metadata, inSeconds(30));
  check(second.id.startsWith('inv-') && second.id !== invoiceId,
    'CreateInvoice within a 30 s deadline succeeds');
  try {
    await call(client, 'CloseInvoice', { invoice_id: second.id }, metadata, new Date(Date.now() - 1000));
    check(false, 'a call whose deadline has passed fails');
  } catch (error) {
    check(error.code === grpc.status.DEADLINE_EXCEEDED,
      `an expired deadline gives DEADLINE_EXCEEDED: ${error.code}`);
  }

  client.close();
  if (failures.length > 0) {
    console.log(`node client: ${failures.length} check(s) failed`);
    return 1;
  }
  console.log('node client: all checks passed');
  return 0;
}

if (process.argv.length !== 3) {
  console.error('usage: node scenario.js HOST:PORT');
  process.exit(2);
}
main(process.argv[2]).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`node client: unexpected error: ${error.stack || error}`);
    process.exit(1);
  },
);
