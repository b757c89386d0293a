//! The seed generator's vocabulary: products, call types and what each side says in them,
//! names, companies, tags and the coaching feedback phrases per dimension. Data only; the
//! generator in the parent module picks from it.

use crate::model::{Dimension, Role};

/// Labels some calls carry, with the percentage of calls carrying each.
pub(super) const RARE_TAGS: &[(&str, u32)] = &[
    ("competitive", 12),
    ("expansion", 8),
    ("security-review", 4),
    ("churn-risk", 2),
];

/// The deal stage a call of this type belongs to.
pub(super) fn deal_stage(call_type: &str) -> &'static str {
    match call_type {
        "discovery" => "qualification",
        "demo" | "technical_deep_dive" | "poc_review" => "evaluation",
        "negotiation" => "negotiation",
        "renewal" | "qbr" => "renewal",
        _ => "open",
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Product {
    Analytics,
    Pipelines,
    Bundle,
}

impl Product {
    pub(super) fn name(self) -> &'static str {
        match self {
            Product::Analytics => "Lumen Analytics",
            Product::Pipelines => "Lumen Pipelines",
            Product::Bundle => "Lumen Analytics + Pipelines",
        }
    }

    pub(super) fn competitors(self) -> &'static [&'static str] {
        match self {
            Product::Analytics => &["Brightlens BI", "Quarry Insights"],
            Product::Pipelines => &["Fivetide", "StreamForge"],
            Product::Bundle => &[
                "Brightlens BI",
                "Fivetide",
                "Quarry Insights",
                "StreamForge",
            ],
        }
    }

    pub(super) fn features(self) -> &'static [&'static str] {
        match self {
            Product::Analytics => ANALYTICS_FEATURES,
            Product::Pipelines => PIPELINES_FEATURES,
            Product::Bundle => BUNDLE_FEATURES,
        }
    }

    pub(super) fn rep_lines(self) -> &'static [&'static str] {
        match self {
            Product::Analytics => ANALYTICS_REP,
            Product::Pipelines => PIPELINES_REP,
            Product::Bundle => BUNDLE_REP,
        }
    }

    pub(super) fn customer_lines(self) -> &'static [&'static str] {
        match self {
            Product::Analytics => ANALYTICS_CUSTOMER,
            Product::Pipelines => PIPELINES_CUSTOMER,
            Product::Bundle => BUNDLE_CUSTOMER,
        }
    }
}

/// A kind of call: its name, typical length and what each side says.
pub(super) struct CallType {
    pub(super) name: &'static str,
    pub(super) label: &'static str,
    pub(super) minutes: i32,
    pub(super) rep_lines: &'static [&'static str],
    pub(super) customer_lines: &'static [&'static str],
}

pub(super) fn call_types(role: Role) -> &'static [CallType] {
    match role {
        Role::Ae => &CALL_TYPES[0..4],
        Role::Se => &CALL_TYPES[4..7],
        Role::Csm => &CALL_TYPES[7..11],
    }
}

pub(super) fn teams(role: Role) -> &'static [&'static str] {
    match role {
        Role::Ae => &[
            "Enterprise East",
            "Enterprise West",
            "Mid-Market",
            "Commercial EMEA",
        ],
        Role::Se => &["Solutions Engineering NA", "Solutions Engineering EMEA"],
        Role::Csm => &["Customer Success Strategic", "Customer Success Scale"],
    }
}

pub(super) static CALL_TYPES: [CallType; 11] = [
    CallType {
        name: "discovery",
        label: "discovery",
        minutes: 30,
        rep_lines: DISCOVERY_REP,
        customer_lines: DISCOVERY_CUSTOMER,
    },
    CallType {
        name: "demo",
        label: "demo",
        minutes: 45,
        rep_lines: DEMO_REP,
        customer_lines: DEMO_CUSTOMER,
    },
    CallType {
        name: "negotiation",
        label: "negotiation",
        minutes: 35,
        rep_lines: NEGOTIATION_REP,
        customer_lines: NEGOTIATION_CUSTOMER,
    },
    CallType {
        name: "follow_up",
        label: "follow-up",
        minutes: 25,
        rep_lines: DISCOVERY_REP,
        customer_lines: NEGOTIATION_CUSTOMER,
    },
    CallType {
        name: "technical_deep_dive",
        label: "technical deep dive",
        minutes: 50,
        rep_lines: TECHNICAL_REP,
        customer_lines: TECHNICAL_CUSTOMER,
    },
    CallType {
        name: "demo",
        label: "technical demo",
        minutes: 45,
        rep_lines: DEMO_REP,
        customer_lines: TECHNICAL_CUSTOMER,
    },
    CallType {
        name: "poc_review",
        label: "proof-of-concept review",
        minutes: 40,
        rep_lines: TECHNICAL_REP,
        customer_lines: DEMO_CUSTOMER,
    },
    CallType {
        name: "onboarding",
        label: "onboarding",
        minutes: 40,
        rep_lines: SUCCESS_REP,
        customer_lines: SUCCESS_CUSTOMER,
    },
    CallType {
        name: "qbr",
        label: "quarterly business review",
        minutes: 50,
        rep_lines: SUCCESS_REP,
        customer_lines: SUCCESS_CUSTOMER,
    },
    CallType {
        name: "renewal",
        label: "renewal",
        minutes: 30,
        rep_lines: NEGOTIATION_REP,
        customer_lines: SUCCESS_CUSTOMER,
    },
    CallType {
        name: "escalation",
        label: "escalation",
        minutes: 25,
        rep_lines: SUCCESS_REP,
        customer_lines: TECHNICAL_CUSTOMER,
    },
];

pub(super) const FIRST_NAMES: &[&str] = &[
    "Maya", "Tom", "Hannah", "Priya", "Lucas", "Aisha", "Daniel", "Sofia", "Kenji", "Elena",
    "Marcus", "Chloe", "Rahul", "Ingrid", "Diego", "Fatima", "Oliver", "Mei", "Jonas", "Amara",
    "Noah", "Zara", "Mateo", "Leila", "Samuel", "Yuki", "Ethan", "Nadia", "Liam", "Grace", "Omar",
    "Isabel", "Felix", "Ava", "Ravi", "Clara", "Hugo", "Lena", "Andre", "Tara",
];

pub(super) const LAST_NAMES: &[&str] = &[
    "Chen",
    "Berg",
    "Alvarez",
    "Patel",
    "Okafor",
    "Novak",
    "Schmidt",
    "Rossi",
    "Tanaka",
    "Kowalski",
    "Dubois",
    "Haddad",
    "Johansson",
    "Moreau",
    "Silva",
    "Nguyen",
    "Fischer",
    "Murphy",
    "Costa",
    "Ivanova",
    "Larsen",
    "Mensah",
    "Brennan",
    "Kim",
    "Garcia",
    "Weber",
    "Sato",
    "Lindqvist",
    "Romero",
    "Adeyemi",
    "Horvat",
    "Walsh",
    "Rahman",
    "Keller",
    "Dimitrov",
    "Fontaine",
    "Osei",
    "Varga",
    "Nakamura",
    "Price",
];

pub(super) const COMPANY_NAMES: &[&str] = &[
    "Northwind",
    "Bluefin",
    "Cobalt",
    "Harbor",
    "Juniper",
    "Keystone",
    "Lakeside",
    "Meridian",
    "Orchard",
    "Pinecrest",
    "Quarrystone",
    "Redwood",
    "Summit",
    "Tidewater",
    "Upland",
    "Vantage",
    "Westfield",
    "Yellowpine",
    "Brightwater",
    "Crescent",
    "Evergreen",
    "Foxglove",
    "Granite",
    "Halcyon",
    "Ironbridge",
    "Kestrel",
    "Larkspur",
    "Monarch",
    "Nimbus",
    "Oakridge",
];

pub(super) const COMPANY_SUFFIXES: &[&str] = &[
    "Logistics",
    "Health",
    "Retail",
    "Bank",
    "Insurance",
    "Foods",
    "Energy",
    "Software",
    "Manufacturing",
    "Media",
    "Telecom",
    "Pharma",
    "Travel",
    "Realty",
    "Capital",
];

pub(super) const SOURCES: &[&str] = &[
    "Salesforce",
    "HubSpot",
    "NetSuite",
    "Zendesk",
    "Stripe",
    "Workday",
    "Google Ads",
    "SAP",
    "our production Postgres",
    "the Oracle ERP",
    "SQL Server",
];

pub(super) const WAREHOUSES: &[&str] = &["Snowflake", "BigQuery", "Redshift", "Databricks"];

pub(super) const ANALYTICS_FEATURES: &[&str] = &[
    "the governed metrics layer",
    "scheduled reports",
    "anomaly alerts",
    "Ask Lumen",
    "row-level security",
    "embedded dashboards",
    "Slack delivery",
    "drill-down to row level",
];

pub(super) const PIPELINES_FEATURES: &[&str] = &[
    "change data capture",
    "the Lumen Relay agent",
    "automatic schema-change handling",
    "the dbt integration",
    "reverse ETL",
    "MAR budget alerts",
    "one-minute syncs",
    "column hashing for PII",
];

pub(super) const BUNDLE_FEATURES: &[&str] = &[
    "the governed metrics layer",
    "change data capture",
    "scheduled reports",
    "the dbt integration",
    "the Lumen Relay agent",
    "anomaly alerts",
];

pub(super) const OPENINGS: &[&str] = &[
    "Hi {cust}, thanks for making the time today. I have us down for thirty minutes, does that still work for you?",
    "Good morning {cust}, great to see you again. Before we start, is there anything that changed at {company} since we last spoke?",
    "Thanks for joining, everyone. My plan is to recap where we are, go through your questions on {product}, and agree on next steps. Anything you would add?",
    "Hi {cust}, {rep} here from Lumen. I appreciate you carving out the time, I know it is a busy week for your team.",
];

pub(super) const CUSTOMER_OPENINGS: &[&str] = &[
    "Yes, that works. I have a hard stop at the top of the hour though.",
    "Thanks {rep}. Nothing major changed, but our {quarter} planning started, so timing matters more now.",
    "Sounds good. I brought a colleague from the data team who will have the technical questions.",
    "Happy to be here. We have a lot to cover so let's jump in.",
];

pub(super) const CLOSINGS: &[&str] = &[
    "So to recap: I will send the summary and the proposal by Thursday, and we will book the session with your security team for next week. Does that match your notes?",
    "Great conversation, {cust}. Next step on my side is a tailored demo with your real {source} data; can we hold an hour next Tuesday?",
    "Thanks everyone. I will follow up with the pricing options and the reference customer we discussed, and check in on Friday.",
    "Let me put the action items in writing today so nothing gets lost, and I will loop in our solutions engineer for the technical questions.",
];

pub(super) const CUSTOMER_CLOSINGS: &[&str] = &[
    "That works for us. Send the invite and I will make sure the right people are there.",
    "Sounds good, thanks {rep}. I will share this with my manager before then.",
    "Okay. I cannot promise anything before the budget review, but this was helpful.",
    "Perfect, talk next week.",
];

pub(super) const REP_GENERAL: &[&str] = &[
    "That makes sense.",
    "Can you say a bit more about that?",
    "Let me make sure I understood you correctly.",
    "That is a really common situation for teams your size.",
    "Good question, let me come back to it once I have shown you the setup.",
    "I will write that down so we cover it before the end of the call.",
];

pub(super) const CUSTOMER_GENERAL: &[&str] = &[
    "Right.",
    "Yes, exactly.",
    "I am not sure, I would have to check with the team.",
    "Okay, that is helpful.",
    "Hmm, interesting.",
    "We have heard that before from other vendors, to be honest.",
];

pub(super) const DISCOVERY_REP: &[&str] = &[
    "How does reporting work at {company} today, from the raw data to the numbers your leadership sees?",
    "What prompted you to look at this now rather than next year?",
    "Who else is involved in a decision like this, and how have you bought tools like this before?",
    "If nothing changes, what does that cost you over the next two quarters?",
    "You mentioned month-end close takes about {n} days. Walk me through where the time goes.",
    "What would success look like six months after rollout, in your own words?",
    "How many people on your team spend time on manual exports from {source} every week?",
    "What have you tried so far to fix this, and what got in the way?",
    "Is there a budget set aside for this, or would we need to build the business case together?",
];

pub(super) const DISCOVERY_CUSTOMER: &[&str] = &[
    "Today it is mostly spreadsheets. Someone exports from {source} every Monday and then we reconcile by hand.",
    "Our CFO asked why the revenue number in the board deck differs from the one in the sales dashboard. Nobody could explain it.",
    "We have about {n} analysts and they spend most of their week answering ad-hoc requests.",
    "The decision is mine and my VP's, but procurement and security will both want a say.",
    "We looked at {competitor} last year, but the project stalled when our champion left.",
    "Month-end takes {n} days, sometimes more when the {source} export breaks.",
    "Success would be the leadership team looking at one set of numbers without a data person in the room.",
    "Budget is there in principle, but it has to come out of next quarter's plan.",
];

pub(super) const DEMO_REP: &[&str] = &[
    "Let me show you {feature}, since you said that is where the time goes today.",
    "Here is the same dashboard your finance team builds by hand, refreshed straight from {warehouse}.",
    "Notice that the metric is defined once; every report that uses it updates when the definition changes.",
    "This is what a business user sees. No SQL, but the analysts can still open the generated query.",
    "I set this up with sample data shaped like yours, roughly {big} thousand rows from {source}.",
    "If I change the filter here, you can see it respects the row-level permissions we configured.",
    "The setup you just saw took our team about {weeks} days for a customer your size.",
];

pub(super) const DEMO_CUSTOMER: &[&str] = &[
    "Can it handle our volumes? We have a few hundred million rows in the orders table alone.",
    "How does this compare to what {competitor} showed us last month?",
    "That looks nice, but who maintains these definitions once you are gone?",
    "Can we get this into Slack? Nobody on the sales floor logs into another tool.",
    "What happens when someone changes a column name in {source}?",
    "I like the alerting piece. Can the thresholds differ per region?",
    "How long would it take us to get to what you just showed?",
];

pub(super) const NEGOTIATION_REP: &[&str] = &[
    "On price, the multi-year term is where I have room: eight percent for two years, twelve for three.",
    "I understand {competitor} came in lower on licence cost. Can we compare the total including admin time?",
    "If we can sign before the end of {quarter}, I can ask Deal Desk about the pilot credit, but I cannot promise it today.",
    "What would you need to see in the proposal to take it to your CFO with confidence?",
    "Let's separate the two questions: is this the right solution, and is this the right price?",
    "The renewal uplift is capped at five percent per year, so your costs stay predictable.",
    "If the discount is the blocker, I would rather adjust the scope than cut corners on onboarding.",
];

pub(super) const NEGOTIATION_CUSTOMER: &[&str] = &[
    "Honestly the number is higher than we budgeted. {competitor} quoted us about {n} percent less.",
    "Procurement will push back on anything above last year's spend.",
    "We need the security review finished before legal will even look at the contract.",
    "Can you do monthly billing? An annual prepay is hard for us this year.",
    "If you can match their price, I think we can move quickly.",
    "My CFO will ask what happens if adoption is low after six months.",
    "We want a thirty-day out clause in the first year.",
];

pub(super) const TECHNICAL_REP: &[&str] = &[
    "The agent connects outbound only, so you do not need to open any inbound firewall rules.",
    "Change data capture reads the WAL, so the load on your primary stays under a couple of percent of CPU.",
    "For the proof of concept, let's agree on written success criteria first: sync latency, row counts and one dashboard.",
    "Queries are pushed down to {warehouse}; nothing is copied into our side unless you enable result caching.",
    "Schema changes are detected on the next sync, and new columns show up without a redeploy.",
    "We can hash or block the PII columns before the data ever lands in the warehouse.",
    "I would run the initial load from a read replica outside business hours to be safe.",
];

pub(super) const TECHNICAL_CUSTOMER: &[&str] = &[
    "Our security team will ask where the credentials are stored and who can see them.",
    "We run {source} on premises, behind a pretty strict firewall. How would you reach it?",
    "What is the sync latency in practice, not on the marketing page?",
    "Last time a vendor ran a backfill it took our production database down for an hour.",
    "Do you support SSO through our identity provider and SCIM for provisioning?",
    "How do you handle a table with a few billion rows on the first load?",
    "Where is the data processed? We need it to stay in the EU.",
    "The POC ran fine, but two of the dashboards were slower than we expected.",
];

pub(super) const SUCCESS_REP: &[&str] = &[
    "Looking at usage, {n} of your creators were active last month, up from the quarter before.",
    "The teams that adopted fastest all started with scheduled reports in Slack. Could that work for your regional leads?",
    "Before the renewal, I would like to agree on the three outcomes you want to show your leadership.",
    "I noticed the {source} connector failed twice last week. Our support team is already on it, and here is what happened.",
    "Let's set up a training for the new hires in your finance team; it takes about an hour.",
    "Which of these dashboards does your leadership actually open every week?",
    "We have a new release of {feature} coming next month that addresses the request you raised.",
];

pub(super) const SUCCESS_CUSTOMER: &[&str] = &[
    "Adoption is good in finance, but the sales team still asks us for exports.",
    "The outage last month hurt. My director is asking whether we should keep the contract.",
    "We would like to add another {n} viewers, but the budget owner changed.",
    "Onboarding went smoother than we expected, the training sessions helped a lot.",
    "Our board deck now comes straight out of Lumen, which saved us a couple of days.",
    "We still have a few people who prefer spreadsheets, and honestly I understand why.",
    "What is on the roadmap? We need better mobile support before the field teams will use it.",
];

pub(super) const ANALYTICS_REP: &[&str] = &[
    "Lumen Analytics sits on top of {warehouse}; the data stays where it is and is queried in place.",
    "Business tier is seventy dollars per creator and twelve per viewer, and most customers need one creator for eight to ten viewers.",
    "Ask Lumen only answers from governed metrics and always shows the query it ran.",
    "We are SOC 2 Type II and ISO 27001, and Enterprise adds EU or US data residency.",
];

pub(super) const ANALYTICS_CUSTOMER: &[&str] = &[
    "How is this different from the Brightlens workbooks we already have?",
    "Our analysts love notebooks. Will they feel limited?",
    "Can we embed dashboards in our customer portal?",
];

pub(super) const PIPELINES_REP: &[&str] = &[
    "Lumen Pipelines is priced on monthly active rows, and the historical load is free.",
    "We have over two hundred managed connectors, including {source}, with schema changes handled automatically.",
    "Enterprise syncs every minute and includes the Relay agent and PrivateLink.",
    "You can set a monthly MAR budget with alerts at fifty, eighty and one hundred percent.",
];

pub(super) const PIPELINES_CUSTOMER: &[&str] = &[
    "Usage-based pricing scares our finance team. How do we forecast it?",
    "We already have Airflow jobs for most of this. Why would we pay for it?",
    "Our Oracle database is the hard part. Does CDC work there?",
];

pub(super) const BUNDLE_REP: &[&str] = &[
    "Bundling Analytics and Pipelines takes ten percent off the combined annual total.",
    "With both products, lineage runs from the {source} table all the way to the dashboard tile.",
    "You would get one support contract and one named CSM for the whole stack.",
];

pub(super) const BUNDLE_CUSTOMER: &[&str] = &[
    "Buying both from one vendor makes procurement easier, but it also means more lock-in.",
    "Can we start with Pipelines and add Analytics next year at the same discount?",
];

/// Feedback phrases per dimension.
pub(super) struct Feedback {
    pub(super) strengths: &'static [&'static str],
    pub(super) improvements: &'static [&'static str],
}

pub(super) fn feedback(dim: Dimension) -> &'static Feedback {
    match dim {
        Dimension::ProductKnowledge => &Feedback {
            strengths: &[
                "Described {product} accurately and tied {feature} to the pain {cust} raised.",
                "Quoted pricing and packaging correctly, with the right tier for the stated need.",
                "Routed the deep technical question to the SE instead of guessing.",
                "Positioned against {competitor} with verifiable facts rather than disparagement.",
                "Explained the security posture clearly enough for {cust} to take it to their team.",
            ],
            improvements: &[
                "Tie each capability to a need {cust} named instead of touring features.",
                "Double-check tier limits before quoting them; one figure on the call was off.",
                "Prepare a short answer on how {feature} works, so the conversation keeps its pace.",
                "Avoid committing to roadmap items; say what exists today and offer a follow-up.",
                "Use a customer outcome with numbers rather than a generic claim.",
            ],
        },
        Dimension::Discovery => &Feedback {
            strengths: &[
                "Asked open questions about the current process before presenting anything.",
                "Quantified the cost of the problem with {cust} in their own numbers.",
                "Mapped the decision process and the people involved early in the call.",
                "Followed up on the first answer instead of moving to the next question.",
                "Confirmed the timeline and what triggered the evaluation now.",
            ],
            improvements: &[
                "Ask who else is involved in the decision and how they bought similar tools.",
                "Dig into the impact: how many hours, how much money, which report suffers.",
                "Let {cust} finish before suggesting a solution; two answers were cut short.",
                "Confirm the budget situation instead of assuming it.",
                "Summarize what you heard before moving on, so {cust} can correct it.",
            ],
        },
        Dimension::ObjectionHandling => &Feedback {
            strengths: &[
                "Acknowledged the pricing concern before answering it.",
                "Reframed the comparison with {competitor} around total cost, not licence price.",
                "Traded the concession for a longer term instead of giving it away.",
                "Checked that the answer resolved the concern before moving on.",
                "Stayed calm and curious when {cust} pushed back hard.",
            ],
            improvements: &[
                "Ask what is behind the objection before answering it.",
                "Do not offer a discount before the value is agreed.",
                "Stay within the discount guidelines; anything more goes through Deal Desk.",
                "Confirm the objection is resolved instead of assuming silence means agreement.",
                "Prepare a proof point for the security concern so it does not stall the deal.",
            ],
        },
        Dimension::Engagement => &Feedback {
            strengths: &[
                "Kept a good talk/listen balance and let {cust} lead the middle of the call.",
                "Set a clear agenda at the start and checked it with the customer.",
                "Closed with concrete next steps, owners and dates.",
                "Built rapport naturally by referring back to what {cust} shared earlier.",
                "Involved every participant, including the quieter colleague.",
            ],
            improvements: &[
                "Talk less during the demo; pause and ask what resonates.",
                "End with a dated next step instead of a general promise to follow up.",
                "Check in with the second stakeholder, who barely spoke.",
                "Open with an agenda so the customer knows where the call is going.",
                "Summarize the action items before ending the call.",
            ],
        },
    }
}
