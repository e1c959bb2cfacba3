//! The sandbox's seed data: the JSON fixture format, the built-in default
//! fixture, and the checks that turn a file into a [`Fixture`] or into an
//! error naming the file, the place and the problem.
//!
//! Unknown fields are refused (`deny_unknown_fields`) so that a typo in a
//! hand-written fixture is reported instead of silently ignored.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// The built-in fixture, as shipped (`gormic-gateway sandbox --print-fixture`).
pub const DEFAULT_FIXTURE_JSON: &str = include_str!("default_fixture.json");

/// Invoice numbers stay below 2^53 so that every JSON reader sees them exactly.
pub(crate) const MAX_INVOICE_NUMBER: u64 = (1 << 53) - 1;

/// A checked fixture: every reference resolves, ids are unique.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub(crate) first_invoice_number: u64,
    pub(crate) invoice_source: String,
    pub(crate) customers: HashMap<String, Customer>,
    pub(crate) orders: HashMap<String, Order>,
    pub(crate) invoices: Vec<SeedInvoice>,
}

/// Why a fixture was refused. `origin` is the file path, or `<built-in>`.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read sandbox fixture {origin}: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("sandbox fixture {origin}: line {line}, column {column}: {problem}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        problem: String,
    },
    #[error("sandbox fixture {origin}: {location}: {problem}")]
    Invalid {
        origin: String,
        /// e.g. `orders[2] (id "ord-x"), field customerId`.
        location: String,
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FixtureFile {
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default = "default_first_number")]
    first_invoice_number: u64,
    #[serde(default = "default_source")]
    invoice_source: String,
    #[serde(default)]
    customers: Vec<Customer>,
    orders: Vec<Order>,
    #[serde(default)]
    invoices: Vec<SeedInvoice>,
}

fn default_first_number() -> u64 {
    1
}

fn default_source() -> String {
    "sandbox".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Customer {
    pub id: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OrderStatus {
    Open,
    Closed,
    Canceled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum InvoiceType {
    Standard,
    Prepayment,
    CreditNote,
    DebitNote,
}

impl InvoiceType {
    #[cfg(test)]
    pub const ALL: [Self; 4] = [
        Self::Standard,
        Self::Prepayment,
        Self::CreditNote,
        Self::DebitNote,
    ];

    /// The REST spelling; `None` for a value the API does not know.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "standard" => Self::Standard,
            "prepayment" => Self::Prepayment,
            "credit-note" => Self::CreditNote,
            "debit-note" => Self::DebitNote,
            _ => return None,
        })
    }

    pub fn is_note(self) -> bool {
        matches!(self, Self::CreditNote | Self::DebitNote)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum InvoiceStatus {
    Open,
    Closed,
}

/// Who issued an invoice: only invoices issued through the API may be
/// deleted through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Channel {
    #[default]
    Api,
    Pos,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Order {
    pub id: String,
    pub status: OrderStatus,
    #[serde(default)]
    pub customer_id: Option<String>,
    pub payment_complete: bool,
    /// The invoice types this order accepts; all four when absent.
    #[serde(default)]
    pub invoice_types: Option<Vec<InvoiceType>>,
    #[serde(default)]
    pub lines: Vec<Line>,
    #[serde(default)]
    #[allow(dead_code)]
    pub note: Option<String>,
}

impl Order {
    pub fn accepts(&self, kind: InvoiceType) -> bool {
        self.invoice_types
            .as_ref()
            .is_none_or(|types| types.contains(&kind))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Line {
    pub id: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    #[serde(default = "default_quantity")]
    #[allow(dead_code)]
    pub quantity: u32,
    #[serde(default)]
    pub draft: bool,
    #[serde(default)]
    pub gift_card: Option<GiftCard>,
}

fn default_quantity() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct GiftCard {
    #[serde(default)]
    pub recipient: Option<Recipient>,
}

/// Not checked against the customers on load: a dangling recipient or a bad
/// phone is a scenario the fixture may want to stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Recipient {
    pub customer_id: String,
    pub phone: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SeedInvoice {
    pub id: String,
    pub order_id: String,
    #[serde(rename = "type", default = "default_type")]
    pub kind: InvoiceType,
    pub status: InvoiceStatus,
    #[serde(default)]
    pub invoice_number: Option<u64>,
    #[serde(default)]
    pub invoiced_at: Option<String>,
    #[serde(default)]
    pub reference_invoice_id: Option<String>,
    #[serde(default)]
    pub apply_expires_at: Option<String>,
    #[serde(default)]
    pub channel: Channel,
    #[serde(default = "default_generated")]
    pub document_generated: bool,
    #[serde(default)]
    #[allow(dead_code)]
    pub note: Option<String>,
}

fn default_type() -> InvoiceType {
    InvoiceType::Standard
}

fn default_generated() -> bool {
    true
}

impl Fixture {
    /// The fixture that ships with the binary.
    pub fn builtin() -> Self {
        match Self::from_json(DEFAULT_FIXTURE_JSON, "<built-in>") {
            Ok(fixture) => fixture,
            // The unit tests load it; a broken build-in is a build defect.
            Err(error) => unreachable!("the built-in sandbox fixture is invalid: {error}"),
        }
    }

    /// Reads and checks a fixture file.
    pub fn from_file(path: &Path) -> Result<Self, FixtureError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::from_json(&text, &origin)
    }

    /// Parses and checks fixture JSON; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, FixtureError> {
        let file: FixtureFile =
            serde_json::from_str(text).map_err(|error| FixtureError::Syntax {
                origin: origin.to_owned(),
                line: error.line(),
                column: error.column(),
                problem: strip_position(&error),
            })?;
        validate(file).map_err(|(location, problem)| FixtureError::Invalid {
            origin: origin.to_owned(),
            location,
            problem,
        })
    }

    /// How many orders the fixture seeds (for the start-up log line).
    pub fn order_count(&self) -> usize {
        self.orders.len()
    }
}

/// serde_json appends " at line L column C"; the error reports them apart.
fn strip_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_owned()
}

/// (location, problem) of the first semantic error.
type Invalid = (String, String);

struct At<'a> {
    list: &'static str,
    index: usize,
    id: &'a str,
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}] (id {:?})", self.list, self.index, self.id)
    }
}

fn invalid(at: &At<'_>, field: &str, problem: impl Into<String>) -> Invalid {
    (format!("{at}, field {field}"), problem.into())
}

fn validate(file: FixtureFile) -> Result<Fixture, Invalid> {
    if file.first_invoice_number == 0 || file.first_invoice_number > MAX_INVOICE_NUMBER {
        return Err((
            "field firstInvoiceNumber".to_owned(),
            format!("must be between 1 and {MAX_INVOICE_NUMBER}"),
        ));
    }
    if file.invoice_source.trim().is_empty() {
        return Err((
            "field invoiceSource".to_owned(),
            "must not be empty".to_owned(),
        ));
    }

    let mut customers = HashMap::new();
    for (index, customer) in file.customers.into_iter().enumerate() {
        let at = At {
            list: "customers",
            index,
            id: &customer.id,
        };
        check_id(&at)?;
        if customer.email.as_deref().is_some_and(|e| !e.contains('@')) {
            return Err(invalid(&at, "email", "is not an e-mail address"));
        }
        if customers.contains_key(&customer.id) {
            return Err(invalid(&at, "id", "is used by another customer"));
        }
        customers.insert(customer.id.clone(), customer);
    }

    let mut orders = HashMap::new();
    for (index, order) in file.orders.into_iter().enumerate() {
        let at = At {
            list: "orders",
            index,
            id: &order.id,
        };
        check_id(&at)?;
        if orders.contains_key(&order.id) {
            return Err(invalid(&at, "id", "is used by another order"));
        }
        if let Some(customer) = &order.customer_id
            && !customers.contains_key(customer)
        {
            return Err(invalid(
                &at,
                "customerId",
                format!("customer {customer:?} is not defined in customers"),
            ));
        }
        if order.invoice_types.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                &at,
                "invoiceTypes",
                "must list at least one type (leave it out to accept all)",
            ));
        }
        let mut lines = HashSet::new();
        for line in &order.lines {
            if !lines.insert(line.id.as_str()) {
                return Err(invalid(
                    &at,
                    "lines",
                    format!("line id {:?} is used twice", line.id),
                ));
            }
        }
        orders.insert(order.id.clone(), order);
    }

    let mut ids = HashSet::new();
    let mut numbers = HashSet::new();
    let all_ids: HashSet<&str> = file.invoices.iter().map(|i| i.id.as_str()).collect();
    for (index, invoice) in file.invoices.iter().enumerate() {
        let at = At {
            list: "invoices",
            index,
            id: &invoice.id,
        };
        check_id(&at)?;
        if !ids.insert(invoice.id.as_str()) {
            return Err(invalid(&at, "id", "is used by another invoice"));
        }
        let Some(order) = orders.get(&invoice.order_id) else {
            return Err(invalid(
                &at,
                "orderId",
                format!("order {:?} is not defined in orders", invoice.order_id),
            ));
        };
        if !order.accepts(invoice.kind) {
            return Err(invalid(
                &at,
                "type",
                format!("order {:?} does not accept this type", order.id),
            ));
        }
        match (invoice.status, invoice.invoice_number) {
            (InvoiceStatus::Closed, None) => {
                return Err(invalid(
                    &at,
                    "invoiceNumber",
                    "is required for a closed invoice",
                ));
            }
            (InvoiceStatus::Open, Some(_)) => {
                return Err(invalid(
                    &at,
                    "invoiceNumber",
                    "an open invoice has no number yet",
                ));
            }
            (_, Some(number)) if number == 0 || number > MAX_INVOICE_NUMBER => {
                return Err(invalid(
                    &at,
                    "invoiceNumber",
                    format!("must be between 1 and {MAX_INVOICE_NUMBER}"),
                ));
            }
            (_, Some(number)) if !numbers.insert(number) => {
                return Err(invalid(
                    &at,
                    "invoiceNumber",
                    format!("{number} is used by another invoice"),
                ));
            }
            _ => {}
        }
        if let Some(at_time) = &invoice.invoiced_at
            && humantime::parse_rfc3339_weak(at_time).is_err()
        {
            return Err(invalid(
                &at,
                "invoicedAt",
                format!("{at_time:?} is not an RFC 3339 date-time"),
            ));
        }
        if let Some(reference) = &invoice.reference_invoice_id
            && !all_ids.contains(reference.as_str())
        {
            return Err(invalid(
                &at,
                "referenceInvoiceId",
                format!("invoice {reference:?} is not defined in invoices"),
            ));
        }
    }

    Ok(Fixture {
        first_invoice_number: file.first_invoice_number,
        invoice_source: file.invoice_source,
        customers,
        orders,
        invoices: file.invoices,
    })
}

fn check_id(at: &At<'_>) -> Result<(), Invalid> {
    if at.id.trim().is_empty() {
        return Err(invalid(at, "id", "must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_fixture_loads() {
        let fixture = Fixture::from_json(DEFAULT_FIXTURE_JSON, "<built-in>").unwrap();
        assert!(fixture.orders.contains_key("ord-ready"));
        assert_eq!(fixture.first_invoice_number, 1001);
        for kind in InvoiceType::ALL {
            assert!(fixture.orders["ord-ready"].accepts(kind));
        }
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let error = Fixture::from_json("{\n  \"orders\": [\n    {\"id\": }\n  ]\n}", "f.json")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("sandbox fixture f.json: line 3, column"),
            "{error}"
        );
        assert!(error.contains("expected value"), "{error}");
    }

    #[test]
    fn typos_are_refused() {
        let error = Fixture::from_json(r#"{"orders": [], "invoicez": []}"#, "f.json")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `invoicez`"), "{error}");
    }

    #[test]
    fn semantic_errors_name_the_order_and_field() {
        let json = r#"{"customers": [], "orders": [
            {"id": "ord-1", "status": "open", "customerId": "cus-x", "paymentComplete": true}
        ]}"#;
        let error = Fixture::from_json(json, "f.json").unwrap_err().to_string();
        assert_eq!(
            error,
            "sandbox fixture f.json: orders[0] (id \"ord-1\"), field customerId: \
             customer \"cus-x\" is not defined in customers"
        );
    }

    #[test]
    fn closed_seed_invoices_need_unique_numbers() {
        let json = r#"{"orders": [{"id": "o", "status": "closed", "paymentComplete": true}],
          "invoices": [
            {"id": "a", "orderId": "o", "status": "closed", "invoiceNumber": 7},
            {"id": "b", "orderId": "o", "status": "closed", "invoiceNumber": 7}
          ]}"#;
        let error = Fixture::from_json(json, "f.json").unwrap_err().to_string();
        assert!(
            error.contains("invoices[1] (id \"b\"), field invoiceNumber: 7 is used"),
            "{error}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let error = Fixture::from_file(Path::new("/nonexistent/fixture.json"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cannot read sandbox fixture /nonexistent/fixture.json:"),
            "{error}"
        );
    }
}
