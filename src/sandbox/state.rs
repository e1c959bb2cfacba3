//! The invoice life cycle of one organization: its invoices, its counters,
//! and the rules behind every error code of the spec. Pure and synchronous
//! (the caller holds the organization's lock and passes the clock), so each
//! rule is unit-tested here without HTTP.
//!
//! Orders and customers come from the fixture and never change; only
//! invoices do. docs/sandbox.md lists the order in which rules are checked.

use std::collections::{BTreeMap, HashSet};

use super::fixture::{
    Channel, Fixture, InvoiceStatus, InvoiceType, MAX_INVOICE_NUMBER, Order, OrderStatus,
};

/// Invoices one organization may hold, so that a runaway client cannot
/// exhaust the sandbox's memory.
pub(crate) const MAX_INVOICES: usize = 100_000;

/// Why an operation was refused, and how the API says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A functional error: HTTP 400 `{"error": {"code": …}}`.
    Code(&'static str),
    /// Something the spec has no code for is absent: HTTP 404 with a message.
    Missing(String),
    /// A request the API cannot read or accept: HTTP 400 with a message, no code.
    Invalid(String),
}

use Refusal::Code;

#[derive(Debug, Clone)]
pub(crate) struct Invoice {
    pub order_id: String,
    pub kind: InvoiceType,
    pub status: InvoiceStatus,
    pub number: Option<u64>,
    pub invoiced_at: Option<String>,
    pub reference_invoice_id: Option<String>,
    pub apply_expires_at: Option<String>,
    pub channel: Channel,
    pub document_generated: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CreateParams {
    pub order_id: String,
    /// The REST `type`, unparsed: an unknown value is `TYPE_NOT_SUPPORTED`.
    pub kind: Option<String>,
    pub reference_invoice_id: Option<String>,
    pub apply_expires_at: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct UpdateParams {
    pub id: String,
    pub order_id: String,
    pub reference_invoice_id: Option<String>,
    pub apply_expires_at: Option<String>,
}

/// What closing an invoice assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closed {
    pub number: u64,
    pub source: String,
    pub invoiced_at: String,
}

/// One organization's invoices; created from the fixture on first use.
#[derive(Debug)]
pub(crate) struct Tenant {
    /// Short, stable tag of the organization-id, so that ids made for one
    /// organization are unknown to every other.
    tag: String,
    invoices: BTreeMap<String, Invoice>,
    /// Ids of deleted invoices: deleting one again is `INVOICE_NOT_FOUND`.
    deleted: HashSet<String>,
    next_number: u64,
    next_id: u64,
    next_message: u64,
}

impl Tenant {
    pub fn new(fixture: &Fixture, organization_id: &str) -> Self {
        let invoices: BTreeMap<String, Invoice> = fixture
            .invoices
            .iter()
            .map(|seed| {
                let invoice = Invoice {
                    order_id: seed.order_id.clone(),
                    kind: seed.kind,
                    status: seed.status,
                    number: seed.invoice_number,
                    invoiced_at: seed.invoiced_at.clone(),
                    reference_invoice_id: seed.reference_invoice_id.clone(),
                    apply_expires_at: seed.apply_expires_at.clone(),
                    channel: seed.channel,
                    document_generated: seed.document_generated,
                };
                (seed.id.clone(), invoice)
            })
            .collect();
        let after_seeds = invoices
            .values()
            .filter_map(|i| i.number)
            .max()
            .map_or(1, |n| n.saturating_add(1));
        Self {
            tag: format!("{:08x}", fnv1a(organization_id.as_bytes())),
            invoices,
            deleted: HashSet::new(),
            next_number: after_seeds.max(fixture.first_invoice_number),
            next_id: 1,
            next_message: 1,
        }
    }

    #[cfg(test)]
    pub fn invoice(&self, id: &str) -> Option<&Invoice> {
        self.invoices.get(id)
    }

    /// Checks, in order: the order exists; the type is known; the order is
    /// not canceled; the order accepts the type; a prepayment is not for a
    /// closed order; a note references a closed standard invoice of the order.
    pub fn create(&mut self, fixture: &Fixture, params: CreateParams) -> Result<String, Refusal> {
        let order = order(fixture, &params.order_id)?;
        let kind = match params.kind.as_deref() {
            None => InvoiceType::Standard,
            Some(kind) => InvoiceType::parse(kind).ok_or(Code("TYPE_NOT_SUPPORTED"))?,
        };
        if order.status == OrderStatus::Canceled {
            return Err(Code("ORDER_CANCELED"));
        }
        if !order.accepts(kind) {
            return Err(Code("TYPE_NOT_SUPPORTED"));
        }
        if kind == InvoiceType::Prepayment && order.status == OrderStatus::Closed {
            return Err(Code("ORDER_CLOSED"));
        }
        if kind.is_note() {
            let Some(reference) = &params.reference_invoice_id else {
                return Err(Refusal::Invalid(
                    "params.referenceInvoiceId is required for credit and debit notes".to_owned(),
                ));
            };
            let reference = self
                .invoices
                .get(reference)
                .filter(|r| r.order_id == order.id)
                .ok_or(Code("REF_INVOICE_NOT_FOUND"))?;
            if reference.kind != InvoiceType::Standard {
                return Err(Code("NON_STANDARD_REF_INVOICE"));
            }
            if reference.status != InvoiceStatus::Closed {
                return Err(Code("REF_INVOICE_STILL_OPEN"));
            }
        }
        if self.invoices.len() >= MAX_INVOICES {
            return Err(Refusal::Invalid(format!(
                "sandbox limit: an organization holds at most {MAX_INVOICES} invoices"
            )));
        }

        let id = self.new_id();
        self.invoices.insert(
            id.clone(),
            Invoice {
                order_id: order.id.clone(),
                kind,
                status: InvoiceStatus::Open,
                number: None,
                invoiced_at: None,
                reference_invoice_id: params.reference_invoice_id,
                apply_expires_at: params.apply_expires_at,
                channel: Channel::Api,
                document_generated: false,
            },
        );
        Ok(id)
    }

    /// Checks: `params.id` is the path id; the invoice exists and belongs to
    /// `params.orderId` (else `NotFound`); it is open; something changes; a
    /// new reference invoice exists (else `NotFound`).
    pub fn update(&mut self, uid: &str, params: UpdateParams) -> Result<(), Refusal> {
        if params.id != uid {
            return Err(Refusal::Invalid(
                "params.id must be the invoice id of the path".to_owned(),
            ));
        }
        let invoice = self
            .invoices
            .get(uid)
            .filter(|i| i.order_id == params.order_id)
            .ok_or(Code("NotFound"))?;
        if invoice.status == InvoiceStatus::Closed {
            return Err(Refusal::Invalid(
                "a closed invoice can no longer be updated".to_owned(),
            ));
        }
        let new_reference = params
            .reference_invoice_id
            .filter(|r| invoice.reference_invoice_id.as_ref() != Some(r));
        let new_expiry = params
            .apply_expires_at
            .filter(|e| invoice.apply_expires_at.as_ref() != Some(e));
        if new_reference.is_none() && new_expiry.is_none() {
            return Err(Code("NoChanges"));
        }
        if let Some(reference) = &new_reference
            && !self.invoices.contains_key(reference)
        {
            return Err(Code("NotFound"));
        }
        let Some(invoice) = self.invoices.get_mut(uid) else {
            return Err(Code("NotFound"));
        };
        if new_reference.is_some() {
            invoice.reference_invoice_id = new_reference;
        }
        if new_expiry.is_some() {
            invoice.apply_expires_at = new_expiry;
        }
        Ok(())
    }

    /// Checks: a deleted invoice is `INVOICE_NOT_FOUND`, one never seen
    /// `NotFound`; it was issued through the API (else `NOT_ALLOWED`); it is
    /// open; its order is neither canceled nor closed; the order has no lines.
    pub fn delete(&mut self, fixture: &Fixture, uid: &str) -> Result<(), Refusal> {
        if self.deleted.contains(uid) {
            return Err(Code("INVOICE_NOT_FOUND"));
        }
        let invoice = self.invoices.get(uid).ok_or(Code("NotFound"))?;
        if invoice.channel != Channel::Api {
            return Err(Code("NOT_ALLOWED"));
        }
        if invoice.status == InvoiceStatus::Closed {
            return Err(Code("INVOICE_CLOSED"));
        }
        let order = order(fixture, &invoice.order_id)?;
        match order.status {
            OrderStatus::Canceled => return Err(Code("ORDER_CANCELED")),
            OrderStatus::Closed => return Err(Code("ORDER_CLOSED")),
            OrderStatus::Open => {}
        }
        if !order.lines.is_empty() {
            return Err(Code("INVOICE_CONTAIN_LINES"));
        }
        self.invoices.remove(uid);
        self.deleted.insert(uid.to_owned());
        Ok(())
    }

    /// Checks, in order: the invoice exists (else 404 without a code: the
    /// spec has none for close); it is open; the order is not canceled; a
    /// prepayment's order is still open, a standard invoice's order is
    /// closed; the order has lines, none of them draft; it has a customer; a
    /// standard invoice's order is paid; every gift card has a recipient who
    /// exists and whose phone is valid. Then assigns the next number.
    pub fn close(
        &mut self,
        fixture: &Fixture,
        uid: &str,
        invoiced_at: String,
    ) -> Result<Closed, Refusal> {
        let invoice = self
            .invoices
            .get(uid)
            .ok_or_else(|| Refusal::Missing(format!("invoice {uid:?} not found")))?;
        if invoice.status == InvoiceStatus::Closed {
            return Err(Code("ALREADY_CLOSED"));
        }
        let order = order(fixture, &invoice.order_id)?;
        if order.status == OrderStatus::Canceled {
            return Err(Code("ORDER_CANCELED"));
        }
        match (invoice.kind, order.status) {
            (InvoiceType::Prepayment, OrderStatus::Closed) => return Err(Code("ORDER_CLOSED")),
            (InvoiceType::Standard, OrderStatus::Open) => return Err(Code("ORDER_NOT_CLOSED")),
            _ => {}
        }
        if order.lines.is_empty() {
            return Err(Code("INVOICE_EMPTY"));
        }
        if order.lines.iter().any(|line| line.draft) {
            return Err(Code("DRAFT_LINES_EXISTS"));
        }
        if order.customer_id.is_none() {
            return Err(Code("CUSTOMER_REQUIRED"));
        }
        if invoice.kind == InvoiceType::Standard && !order.payment_complete {
            return Err(Code("PAYMENT_NOT_COMPLETE"));
        }
        for card in order
            .lines
            .iter()
            .filter_map(|line| line.gift_card.as_ref())
        {
            let recipient = card
                .recipient
                .as_ref()
                .ok_or(Code("MISSING_GIFT_CARD_RECIPIENT"))?;
            if !fixture.customers.contains_key(&recipient.customer_id) {
                return Err(Code("GIFT_CARD_RECIPIENT_NOT_EXIST"));
            }
            if !valid_phone(&recipient.phone) {
                return Err(Code("INVALID_GIFT_CARD_RECIPIENT_PHONE"));
            }
        }
        let number = self.next_number;
        if number > MAX_INVOICE_NUMBER {
            return Err(Refusal::Invalid(
                "sandbox limit: invoice numbers are exhausted".to_owned(),
            ));
        }

        let Some(invoice) = self.invoices.get_mut(uid) else {
            return Err(Refusal::Missing(format!("invoice {uid:?} not found")));
        };
        self.next_number += 1;
        invoice.status = InvoiceStatus::Closed;
        invoice.number = Some(number);
        invoice.invoiced_at = Some(invoiced_at.clone());
        invoice.document_generated = true;
        Ok(Closed {
            number,
            source: fixture.invoice_source.clone(),
            invoiced_at,
        })
    }

    /// Checks: the invoice exists; it is closed; its document was
    /// generated; its order's customer has an e-mail. Returns a message id.
    pub fn send(&mut self, fixture: &Fixture, uid: &str) -> Result<String, Refusal> {
        let invoice = self.invoices.get(uid).ok_or(Code("INVOICE_NOT_FOUND"))?;
        if invoice.status != InvoiceStatus::Closed {
            return Err(Code("INVOICE_NOT_CLOSED"));
        }
        if !invoice.document_generated {
            return Err(Code("INVOICE_NOT_GENERATED"));
        }
        let order = order(fixture, &invoice.order_id)?;
        let has_email = order
            .customer_id
            .as_ref()
            .and_then(|id| fixture.customers.get(id))
            .and_then(|customer| customer.email.as_deref())
            .is_some_and(|email| !email.is_empty());
        if !has_email {
            return Err(Code("EMAIL_NOT_DEFINED"));
        }
        let message_id = format!("msg-{}-{}", self.tag, self.next_message);
        self.next_message += 1;
        Ok(message_id)
    }

    /// `inv-<organization tag>-<n>`, skipping any id the fixture already uses.
    fn new_id(&mut self) -> String {
        loop {
            let id = format!("inv-{}-{}", self.tag, self.next_id);
            self.next_id += 1;
            if !self.invoices.contains_key(&id) && !self.deleted.contains(&id) {
                return id;
            }
        }
    }
}

fn order<'a>(fixture: &'a Fixture, id: &str) -> Result<&'a Order, Refusal> {
    fixture
        .orders
        .get(id)
        .ok_or_else(|| Refusal::Missing(format!("order {id:?} not found")))
}

/// E.164: `+`, then 8 to 15 digits, the first not 0.
fn valid_phone(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// 32-bit FNV-1a: stable across runs and platforms, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Fixture, Tenant) {
        let fixture = Fixture::builtin();
        let tenant = Tenant::new(&fixture, "org-test");
        (fixture, tenant)
    }

    fn create(tenant: &mut Tenant, fixture: &Fixture, order: &str, kind: Option<&str>) -> String {
        create_ref(tenant, fixture, order, kind, None).expect("create")
    }

    fn create_ref(
        tenant: &mut Tenant,
        fixture: &Fixture,
        order: &str,
        kind: Option<&str>,
        reference: Option<&str>,
    ) -> Result<String, Refusal> {
        tenant.create(
            fixture,
            CreateParams {
                order_id: order.into(),
                kind: kind.map(Into::into),
                reference_invoice_id: reference.map(Into::into),
                apply_expires_at: None,
            },
        )
    }

    fn close(tenant: &mut Tenant, fixture: &Fixture, id: &str) -> Result<Closed, Refusal> {
        tenant.close(fixture, id, "2025-02-01T10:00:00Z".into())
    }

    #[test]
    fn happy_path_numbers_from_the_fixture_on() {
        let (fixture, mut tenant) = setup();
        let a = create(&mut tenant, &fixture, "ord-ready", None);
        let b = create(&mut tenant, &fixture, "ord-ready", Some("standard"));
        assert_ne!(a, b);
        assert_eq!(close(&mut tenant, &fixture, &b).unwrap().number, 1001);
        assert_eq!(close(&mut tenant, &fixture, &a).unwrap().number, 1002);
        let message = tenant.send(&fixture, &a).unwrap();
        assert!(message.starts_with("msg-"), "{message}");
        assert_eq!(tenant.invoice(&a).unwrap().number, Some(1002));
    }

    #[test]
    fn ids_differ_between_organizations() {
        let fixture = Fixture::builtin();
        let mut one = Tenant::new(&fixture, "org-1");
        let mut two = Tenant::new(&fixture, "org-2");
        let a = create(&mut one, &fixture, "ord-ready", None);
        let b = create(&mut two, &fixture, "ord-ready", None);
        assert_ne!(a, b);
        assert_eq!(two.send(&fixture, &a), Err(Code("INVOICE_NOT_FOUND")));
    }

    #[test]
    fn create_rules() {
        let (fixture, mut tenant) = setup();
        let refused = |tenant: &mut Tenant, order, kind, reference| {
            create_ref(tenant, &fixture, order, kind, reference).unwrap_err()
        };
        assert_eq!(
            refused(&mut tenant, "ord-canceled", None, None),
            Code("ORDER_CANCELED")
        );
        assert_eq!(
            refused(&mut tenant, "ord-pos", Some("prepayment"), None),
            Code("TYPE_NOT_SUPPORTED")
        );
        assert_eq!(
            refused(&mut tenant, "ord-ready", Some("proforma"), None),
            Code("TYPE_NOT_SUPPORTED")
        );
        assert_eq!(
            refused(&mut tenant, "ord-ready", Some("prepayment"), None),
            Code("ORDER_CLOSED")
        );
        let note = Some("credit-note");
        assert_eq!(
            refused(&mut tenant, "ord-ready", note, Some("inv-nope")),
            Code("REF_INVOICE_NOT_FOUND")
        );
        // A reference of another order is not found for this one.
        assert_eq!(
            refused(&mut tenant, "ord-open", note, Some("inv-closed")),
            Code("REF_INVOICE_NOT_FOUND")
        );
        assert_eq!(
            refused(&mut tenant, "ord-open", note, Some("inv-prepayment-closed")),
            Code("NON_STANDARD_REF_INVOICE")
        );
        assert_eq!(
            refused(
                &mut tenant,
                "ord-ready",
                Some("debit-note"),
                Some("inv-open")
            ),
            Code("REF_INVOICE_STILL_OPEN")
        );
        assert!(matches!(
            refused(&mut tenant, "ord-ready", note, None),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(&mut tenant, "ord-nope", None, None),
            Refusal::Missing(_)
        ));
        create_ref(&mut tenant, &fixture, "ord-ready", note, Some("inv-closed")).unwrap();
        create_ref(&mut tenant, &fixture, "ord-open", Some("prepayment"), None).unwrap();
    }

    #[test]
    fn update_rules() {
        let (_, mut tenant) = setup();
        let params = |order: &str, reference: Option<&str>, expiry: Option<&str>| UpdateParams {
            id: "inv-open".into(),
            order_id: order.into(),
            reference_invoice_id: reference.map(Into::into),
            apply_expires_at: expiry.map(Into::into),
        };
        assert_eq!(
            tenant.update("inv-open", params("ord-ready", None, None)),
            Err(Code("NoChanges"))
        );
        assert_eq!(
            tenant.update(
                "inv-open",
                params("ord-open", None, Some("2025-03-01T00:00:00Z"))
            ),
            Err(Code("NotFound"))
        );
        assert_eq!(
            tenant.update("inv-open", params("ord-ready", Some("inv-nope"), None)),
            Err(Code("NotFound"))
        );
        let expiry = Some("2025-03-01T00:00:00Z");
        tenant
            .update("inv-open", params("ord-ready", None, expiry))
            .unwrap();
        assert_eq!(
            tenant.update("inv-open", params("ord-ready", None, expiry)),
            Err(Code("NoChanges"))
        );
        let mut wrong_id = params("ord-ready", None, Some("x"));
        wrong_id.id = "inv-other".into();
        assert!(matches!(
            tenant.update("inv-open", wrong_id),
            Err(Refusal::Invalid(_))
        ));
        let mut closed = params("ord-ready", None, Some("x"));
        closed.id = "inv-closed".into();
        assert!(matches!(
            tenant.update("inv-closed", closed),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn delete_rules() {
        let (fixture, mut tenant) = setup();
        assert_eq!(tenant.delete(&fixture, "inv-nope"), Err(Code("NotFound")));
        assert_eq!(tenant.delete(&fixture, "inv-pos"), Err(Code("NOT_ALLOWED")));
        assert_eq!(
            tenant.delete(&fixture, "inv-closed"),
            Err(Code("INVOICE_CLOSED"))
        );
        assert_eq!(
            tenant.delete(&fixture, "inv-canceled-order"),
            Err(Code("ORDER_CANCELED"))
        );
        assert_eq!(
            tenant.delete(&fixture, "inv-open"),
            Err(Code("ORDER_CLOSED"))
        );
        let with_lines = create(&mut tenant, &fixture, "ord-open", None);
        assert_eq!(
            tenant.delete(&fixture, &with_lines),
            Err(Code("INVOICE_CONTAIN_LINES"))
        );
        let empty = create(&mut tenant, &fixture, "ord-empty", None);
        tenant.delete(&fixture, &empty).unwrap();
        assert_eq!(
            tenant.delete(&fixture, &empty),
            Err(Code("INVOICE_NOT_FOUND"))
        );
        assert_eq!(
            tenant.send(&fixture, &empty),
            Err(Code("INVOICE_NOT_FOUND"))
        );
    }

    #[test]
    fn close_rules() {
        let (fixture, mut tenant) = setup();
        let mut refused = |order: &str, kind: Option<&str>| {
            let id = create(&mut tenant, &fixture, order, kind);
            close(&mut tenant, &fixture, &id).unwrap_err()
        };
        assert_eq!(refused("ord-open", None), Code("ORDER_NOT_CLOSED"));
        assert_eq!(
            refused("ord-empty", Some("prepayment")),
            Code("INVOICE_EMPTY")
        );
        assert_eq!(refused("ord-draft-lines", None), Code("DRAFT_LINES_EXISTS"));
        assert_eq!(refused("ord-no-customer", None), Code("CUSTOMER_REQUIRED"));
        assert_eq!(refused("ord-unpaid", None), Code("PAYMENT_NOT_COMPLETE"));
        assert_eq!(
            refused("ord-gift-no-recipient", None),
            Code("MISSING_GIFT_CARD_RECIPIENT")
        );
        assert_eq!(
            refused("ord-gift-unknown-recipient", None),
            Code("GIFT_CARD_RECIPIENT_NOT_EXIST")
        );
        assert_eq!(
            refused("ord-gift-bad-phone", None),
            Code("INVALID_GIFT_CARD_RECIPIENT_PHONE")
        );
        assert_eq!(
            close(&mut tenant, &fixture, "inv-closed"),
            Err(Code("ALREADY_CLOSED"))
        );
        assert_eq!(
            close(&mut tenant, &fixture, "inv-canceled-order"),
            Err(Code("ORDER_CANCELED"))
        );
        assert_eq!(
            close(&mut tenant, &fixture, "inv-prepayment-open"),
            Err(Code("ORDER_CLOSED"))
        );
        assert!(matches!(
            close(&mut tenant, &fixture, "inv-nope"),
            Err(Refusal::Missing(_))
        ));
        // A refused close uses no number.
        let id = create(&mut tenant, &fixture, "ord-open", Some("prepayment"));
        assert_eq!(close(&mut tenant, &fixture, &id).unwrap().number, 1001);
    }

    #[test]
    fn send_rules() {
        let (fixture, mut tenant) = setup();
        assert_eq!(
            tenant.send(&fixture, "inv-nope"),
            Err(Code("INVOICE_NOT_FOUND"))
        );
        assert_eq!(
            tenant.send(&fixture, "inv-open"),
            Err(Code("INVOICE_NOT_CLOSED"))
        );
        assert_eq!(
            tenant.send(&fixture, "inv-not-generated"),
            Err(Code("INVOICE_NOT_GENERATED"))
        );
        let id = create(&mut tenant, &fixture, "ord-no-email", None);
        close(&mut tenant, &fixture, &id).unwrap();
        assert_eq!(tenant.send(&fixture, &id), Err(Code("EMAIL_NOT_DEFINED")));
        assert!(tenant.send(&fixture, "inv-closed").is_ok());
    }

    #[test]
    fn phones() {
        assert!(valid_phone("+33612345678"));
        assert!(!valid_phone("0612345678"));
        assert!(!valid_phone("+0612345678"));
        assert!(!valid_phone("+336"));
        assert!(!valid_phone("+33 6 12 34 56 78"));
        assert!(!valid_phone("12-34"));
    }
}
