"""Generate the deterministic sample corpora under data/ (domain, general, dirty, instructions).
Upstream of every stage: `python data/generate.py [--out DIR]` rewrites the files byte-identically."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
from pathlib import Path

SEED = 20240611

# ---------------------------------------------------------------------------
# Template engine: "{slot}" is filled from a vocabulary entry (a list to pick
# from, or a function of the RNG); doc-level values (the drug of an abstract)
# are passed as `fixed` so every sentence of a document agrees.
# ---------------------------------------------------------------------------


class _Slots(dict):
    def __init__(self, rng: random.Random, vocab: dict, fixed: dict):
        super().__init__(fixed)
        self.rng = rng
        self.vocab = vocab
        self.used: dict[str, list[str]] = {}

    def __missing__(self, key: str) -> str:
        base = key.rstrip("0123456789")
        source = self.vocab[base]
        for _ in range(5):  # "{genre} and {genre2}" should name two different genres
            value = source(self.rng) if callable(source) else self.rng.choice(source)
            if value not in self.used.setdefault(base, []):
                break
        self.used[base].append(value)
        return fill(self.rng, value, self.vocab, self) if "{" in value else value


def fill(rng: random.Random, template: str, vocab: dict, fixed: dict | None = None) -> str:
    return template.format_map(_Slots(rng, vocab, fixed or {}))


_AN = re.compile(
    r"\b([Aa]) (?=(?:[aeiAEI]|o(?!ne)|u(?!ni|s|r)|hour|honest|8|11|18|MRI|FDA|NSAID|SSRI|SNRI|ACE|AUC|HR|ECG|EGFR)\w*)"
)


def tidy(sentence: str) -> str:
    sentence = _AN.sub(lambda m: m.group(1) + "n ", sentence)
    sentence = re.sub(r"\s+([,.;:!?])", r"\1", sentence)
    return sentence[:1].upper() + sentence[1:]


def words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------
# Domain vocabulary: clinical pharmacology
# ---------------------------------------------------------------------------

DRUGS = [
    ("atorvastatin", "HMG-CoA reductase inhibitor"),
    ("rosuvastatin", "statin"),
    ("simvastatin", "statin"),
    ("metformin", "biguanide"),
    ("sitagliptin", "DPP-4 inhibitor"),
    ("empagliflozin", "SGLT2 inhibitor"),
    ("dapagliflozin", "SGLT2 inhibitor"),
    ("semaglutide", "GLP-1 receptor agonist"),
    ("liraglutide", "GLP-1 receptor agonist"),
    ("warfarin", "vitamin K antagonist"),
    ("apixaban", "direct factor Xa inhibitor"),
    ("rivaroxaban", "direct factor Xa inhibitor"),
    ("dabigatran etexilate", "direct thrombin inhibitor"),
    ("clopidogrel", "P2Y12 receptor antagonist"),
    ("ticagrelor", "P2Y12 receptor antagonist"),
    ("amlodipine", "dihydropyridine calcium channel blocker"),
    ("lisinopril", "ACE inhibitor"),
    ("losartan", "angiotensin II receptor blocker"),
    ("valsartan", "angiotensin II receptor blocker"),
    ("metoprolol", "beta-adrenergic blocker"),
    ("carvedilol", "beta-adrenergic blocker"),
    ("digoxin", "cardiac glycoside"),
    ("amiodarone", "class III antiarrhythmic"),
    ("furosemide", "loop diuretic"),
    ("spironolactone", "mineralocorticoid receptor antagonist"),
    ("midazolam", "benzodiazepine"),
    ("alprazolam", "benzodiazepine"),
    ("sertraline", "selective serotonin reuptake inhibitor"),
    ("escitalopram", "selective serotonin reuptake inhibitor"),
    ("venlafaxine", "serotonin-norepinephrine reuptake inhibitor"),
    ("quetiapine", "atypical antipsychotic"),
    ("olanzapine", "atypical antipsychotic"),
    ("aripiprazole", "atypical antipsychotic"),
    ("lithium carbonate", "mood stabilizer"),
    ("valproic acid", "antiepileptic drug"),
    ("levetiracetam", "antiepileptic drug"),
    ("carbamazepine", "antiepileptic drug"),
    ("lamotrigine", "antiepileptic drug"),
    ("phenytoin", "antiepileptic drug"),
    ("morphine", "opioid analgesic"),
    ("oxycodone", "opioid analgesic"),
    ("fentanyl", "opioid analgesic"),
    ("tramadol", "opioid analgesic"),
    ("ibuprofen", "nonsteroidal anti-inflammatory drug"),
    ("celecoxib", "COX-2 selective inhibitor"),
    ("vancomycin", "glycopeptide antibiotic"),
    ("gentamicin", "aminoglycoside antibiotic"),
    ("amikacin", "aminoglycoside antibiotic"),
    ("ceftriaxone", "third-generation cephalosporin"),
    ("meropenem", "carbapenem antibiotic"),
    ("piperacillin-tazobactam", "beta-lactam/beta-lactamase inhibitor"),
    ("ciprofloxacin", "fluoroquinolone"),
    ("levofloxacin", "fluoroquinolone"),
    ("linezolid", "oxazolidinone antibiotic"),
    ("fluconazole", "triazole antifungal"),
    ("voriconazole", "triazole antifungal"),
    ("posaconazole", "triazole antifungal"),
    ("tacrolimus", "calcineurin inhibitor"),
    ("cyclosporine", "calcineurin inhibitor"),
    ("mycophenolate mofetil", "antiproliferative immunosuppressant"),
    ("sirolimus", "mTOR inhibitor"),
    ("everolimus", "mTOR inhibitor"),
    ("methotrexate", "antifolate"),
    ("imatinib", "tyrosine kinase inhibitor"),
    ("ibrutinib", "Bruton tyrosine kinase inhibitor"),
    ("osimertinib", "EGFR tyrosine kinase inhibitor"),
    ("pembrolizumab", "anti-PD-1 monoclonal antibody"),
    ("nivolumab", "anti-PD-1 monoclonal antibody"),
    ("trastuzumab", "anti-HER2 monoclonal antibody"),
    ("adalimumab", "TNF-alpha inhibitor"),
    ("infliximab", "TNF-alpha inhibitor"),
    ("omeprazole", "proton pump inhibitor"),
    ("pantoprazole", "proton pump inhibitor"),
    ("ondansetron", "5-HT3 receptor antagonist"),
    ("dolutegravir", "integrase strand transfer inhibitor"),
    ("tenofovir alafenamide", "nucleotide reverse transcriptase inhibitor"),
    ("nirmatrelvir", "SARS-CoV-2 main protease inhibitor"),
    ("levothyroxine", "thyroid hormone replacement"),
    ("prednisolone", "glucocorticoid"),
    ("dexamethasone", "glucocorticoid"),
    ("insulin glargine", "long-acting insulin analogue"),
    ("allopurinol", "xanthine oxidase inhibitor"),
    ("colchicine", "anti-inflammatory alkaloid"),
]

CONDITIONS = [
    "type 2 diabetes mellitus",
    "essential hypertension",
    "heart failure with reduced ejection fraction",
    "atrial fibrillation",
    "hypercholesterolaemia",
    "major depressive disorder",
    "generalized anxiety disorder",
    "schizophrenia",
    "bipolar I disorder",
    "focal epilepsy",
    "chronic low back pain",
    "postoperative pain",
    "rheumatoid arthritis",
    "Crohn's disease",
    "ulcerative colitis",
    "plaque psoriasis",
    "community-acquired pneumonia",
    "complicated urinary tract infection",
    "sepsis",
    "invasive aspergillosis",
    "HIV-1 infection",
    "chronic hepatitis B",
    "COVID-19",
    "non-small cell lung cancer",
    "chronic myeloid leukaemia",
    "HER2-positive breast cancer",
    "chronic lymphocytic leukaemia",
    "metastatic melanoma",
    "chronic kidney disease",
    "gout",
    "hypothyroidism",
    "venous thromboembolism",
    "acute coronary syndrome",
    "gastro-oesophageal reflux disease",
    "chemotherapy-induced nausea",
    "asthma",
    "chronic obstructive pulmonary disease",
    "obesity",
    "osteoarthritis of the knee",
]

POPULATIONS = [
    "healthy adult volunteers",
    "healthy Japanese and Caucasian volunteers",
    "adults with {condition}",
    "older adults aged 65 years or more",
    "children aged 2 to 11 years with {condition}",
    "adolescents with {condition}",
    "patients with moderate hepatic impairment (Child-Pugh B)",
    "patients with end-stage renal disease receiving haemodialysis",
    "critically ill adults in the intensive care unit",
    "pregnant women in the second and third trimester",
    "adults with obesity (BMI ≥ 30 kg/m²)",
    "CYP2C19 poor metabolizers",
    "kidney transplant recipients",
    "liver transplant recipients",
    "patients receiving continuous renal replacement therapy",
    "neonates born before 32 weeks of gestation",
    "outpatients with {condition}",
    "treatment-naive adults with {condition}",
]

DESIGNS = [
    "a randomized, double-blind, placebo-controlled trial",
    "an open-label, two-period, fixed-sequence study",
    "a randomized, open-label, three-way crossover study",
    "a phase I single ascending dose study",
    "a phase I multiple ascending dose study",
    "a retrospective cohort study",
    "a prospective observational study",
    "a population pharmacokinetic analysis",
    "a physiologically based pharmacokinetic (PBPK) modelling study",
    "a nested case-control study",
    "a systematic review and meta-analysis of {n_trials} randomized trials",
    "a multicentre phase II trial",
    "a phase III, non-inferiority trial",
    "a pragmatic, cluster-randomized trial",
    "a single-centre pharmacokinetic substudy",
    "a real-world registry analysis",
]

CYPS = ["CYP2D6", "CYP2C9", "CYP2C19", "CYP2B6", "UGT1A1"]  # polymorphic: poor metabolizers exist
ENZYMES = [
    "CYP3A4",
    "CYP3A4/5",
    "CYP2D6",
    "CYP2C9",
    "CYP2C19",
    "CYP1A2",
    "CYP2B6",
    "UGT1A1",
    "UGT2B7",
    "P-glycoprotein",
    "OATP1B1",
    "BCRP",
    "OCT2",
    "MATE1",
]
INHIBITOR_TARGETS = {
    "ketoconazole": "CYP3A4",
    "itraconazole": "CYP3A4",
    "clarithromycin": "CYP3A4",
    "ritonavir": "CYP3A4",
    "cobicistat": "CYP3A4",
    "verapamil": "P-glycoprotein",
    "fluconazole": "CYP2C9",
    "fluvoxamine": "CYP1A2",
    "paroxetine": "CYP2D6",
    "quinidine": "CYP2D6",
    "gemfibrozil": "OATP1B1",
    "cyclosporine": "OATP1B1",
    "cimetidine": "OCT2",
    "trimethoprim": "MATE1",
    "atazanavir": "UGT1A1",
}
INHIBITORS = list(INHIBITOR_TARGETS)
INDUCERS = ["rifampicin", "carbamazepine", "phenytoin", "efavirenz", "St John's wort", "enzalutamide", "apalutamide"]
PK_PARAMS = [
    "AUC0–∞",
    "AUC0–24",
    "AUCτ",
    "Cmax",
    "Cmin",
    "trough concentration",
    "apparent oral clearance (CL/F)",
    "terminal half-life (t1/2)",
    "apparent volume of distribution (Vz/F)",
    "Tmax",
    "unbound fraction",
]
PK_SHORT = ["AUC", "Cmax", "t1/2", "CL/F", "Vd", "Ctrough", "Tmax"]
OUTCOMES = [
    "all-cause mortality",
    "major adverse cardiovascular events",
    "hospitalization for heart failure",
    "clinical remission at week 12",
    "change from baseline in HbA1c",
    "major bleeding",
    "clinically relevant non-major bleeding",
    "symptomatic venous thromboembolism",
    "progression-free survival",
    "overall survival",
    "treatment failure",
    "seizure freedom",
    "response on the MADRS scale",
    "pain intensity on a 0–10 numeric rating scale",
    "acute kidney injury",
    "QTc prolongation",
    "sustained virological response",
    "time to clinical recovery",
    "30-day readmission",
    "target attainment (fT>MIC of 100%)",
]
ADVERSE = [
    "nausea",
    "headache",
    "dizziness",
    "diarrhoea",
    "fatigue",
    "peripheral oedema",
    "hypoglycaemia",
    "hyperkalaemia",
    "rash",
    "elevated hepatic transaminases",
    "QTc prolongation",
    "neutropenia",
    "thrombocytopenia",
    "nephrotoxicity",
    "somnolence",
    "constipation",
    "insomnia",
    "minor bleeding",
    "infusion-related reactions",
    "myalgia",
]
COVARIATES = [
    "body weight",
    "creatinine clearance",
    "estimated glomerular filtration rate",
    "body surface area",
    "serum albumin",
    "CYP2C19 genotype",
    "CYP2D6 phenotype",
    "concomitant proton pump inhibitor use",
    "smoking status",
    "fat-free mass",
    "total bilirubin",
    "postmenstrual age",
]
JOURNALS = [
    "Clinical Pharmacology & Therapeutics",
    "British Journal of Clinical Pharmacology",
    "Journal of Clinical Pharmacology",
    "European Journal of Clinical Pharmacology",
    "Clinical Pharmacokinetics",
    "Drug Metabolism and Disposition",
    "Antimicrobial Agents and Chemotherapy",
    "Journal of Antimicrobial Chemotherapy",
    "Therapeutic Drug Monitoring",
    "Pharmacotherapy",
    "CPT: Pharmacometrics & Systems Pharmacology",
    "Annals of Pharmacotherapy",
    "Journal of Pharmacokinetics and Pharmacodynamics",
    "Drugs",
    "Diabetes, Obesity and Metabolism",
    "Epilepsia",
    "Thrombosis and Haemostasis",
    "Transplantation",
    "Pediatric Drugs",
    "Clinical Infectious Diseases",
]
LAST_NAMES = [
    "Smith",
    "Nguyen",
    "Müller",
    "García",
    "Okafor",
    "Tanaka",
    "Rossi",
    "Kowalski",
    "Andersson",
    "Patel",
    "O'Brien",
    "Haddad",
    "Jensen",
    "Dubois",
    "Silva",
    "Kim",
    "Cohen",
    "Novak",
    "Fischer",
    "Moreau",
]
FIRST_NAMES = [
    "Anna",
    "James",
    "Maria",
    "David",
    "Sarah",
    "Michael",
    "Laura",
    "Daniel",
    "Emma",
    "Chris",
    "Olivia",
    "Ben",
    "Priya",
    "Tom",
    "Hannah",
    "Luis",
    "Grace",
    "Sam",
    "Chloe",
    "Jake",
    "Nina",
    "Marcus",
    "Ellie",
    "Ryan",
    "Sofia",
    "Aaron",
    "Megan",
    "Leo",
    "Rachel",
    "Omar",
    "Julia",
    "Ethan",
    "Zoe",
    "Noah",
    "Kate",
    "Isaac",
    "Lily",
    "Adam",
    "Ruth",
    "Felix",
]


def _int(lo: int, hi: int):
    return lambda rng: str(rng.randint(lo, hi))


def _ratio_ci(rng: random.Random, label: str, lo: float = 0.45, hi: float = 1.35) -> str:
    point = rng.uniform(lo, hi)
    width = rng.uniform(0.06, 0.35)
    low, high = point * math.exp(-width), point * math.exp(width)
    # The p-value agrees with the interval: significant exactly when the 95% CI excludes 1.
    if low > 1 or high < 1:
        p = rng.choice(["p < 0.001", "p = 0.002", "p = 0.01", "p = 0.03", "p < 0.05"])
    else:
        p = f"p = 0.{rng.randint(12, 94)}"
    return f"{label} {point:.2f}, 95% CI {low:.2f}–{high:.2f}; {p}"


def _p_value(rng: random.Random) -> str:
    return rng.choice(
        [
            "p < 0.001",
            "p < 0.001",
            "p < 0.01",
            "p < 0.05",
            f"p = 0.0{rng.randint(1, 4)}",
            f"p = 0.{rng.randint(10, 89)}",
            "p = 0.002",
        ]
    )


def _fold(rng: random.Random) -> str:
    point = rng.uniform(1.2, 9.5)
    return f"{point:.1f}-fold (90% CI {point * 0.86:.1f}–{point * 1.16:.1f})"


def _gmr(rng: random.Random) -> str:
    point = rng.uniform(78, 128)
    return f"{point:.1f}% (90% CI {point - rng.uniform(4, 11):.1f}–{point + rng.uniform(4, 11):.1f})"


DOSES = [
    "0.5 mg",
    "1 mg",
    "2.5 mg",
    "5 mg",
    "10 mg",
    "20 mg",
    "25 mg",
    "40 mg",
    "50 mg",
    "75 mg",
    "100 mg",
    "150 mg",
    "200 mg",
    "250 mg",
    "300 mg",
    "400 mg",
    "500 mg",
    "600 mg",
    "750 mg",
    "1000 mg",
]
REGIMENS = [
    "once daily",
    "twice daily",
    "three times daily",
    "every 8 hours",
    "every 12 hours",
    "once weekly",
    "as a single oral dose",
    "as a 30-minute intravenous infusion",
    "every 3 weeks",
    "at bedtime",
]

DOMAIN_VOCAB = {
    "condition": CONDITIONS,
    "population": POPULATIONS,
    "design": DESIGNS,
    "enzyme": ENZYMES,
    "cyp": CYPS,
    "inhibitor": INHIBITORS,
    "inducer": INDUCERS,
    "pk": PK_PARAMS,
    "pks": PK_SHORT,
    "outcome": OUTCOMES,
    "adverse": ADVERSE,
    "covariate": COVARIATES,
    "dose": DOSES,
    "regimen": REGIMENS,
    "n_trials": _int(6, 38),
    "n": _int(14, 2400),
    "n_small": _int(12, 48),
    "weeks": lambda rng: rng.choice(
        ["12 weeks", "24 weeks", "52 weeks", "14 days", "28 days", "6 months", "18 months", "2 years"]
    ),
    "mgkg": lambda rng: f"{rng.choice(['0.1', '0.3', '0.5', '1', '2', '5', '7.5', '10', '15', '20'])} mg/kg",
    "hr": lambda rng: _ratio_ci(rng, "HR"),
    "or": lambda rng: _ratio_ci(rng, "OR", 0.4, 2.8),
    "rr": lambda rng: _ratio_ci(rng, "RR", 0.5, 1.6),
    "p": _p_value,
    "fold": _fold,
    "gmr": _gmr,
    "pct": _int(8, 74),
    "pct_small": _int(2, 19),
    "half_life": lambda rng: f"{rng.uniform(1.5, 60):.1f} ± {rng.uniform(0.4, 9):.1f} h",
    "clearance": lambda rng: f"{rng.uniform(0.8, 42):.1f} L/h",
    "vd": lambda rng: f"{rng.uniform(12, 620):.0f} L",
    "cmax_val": lambda rng: f"{rng.uniform(0.05, 48):.2f} {rng.choice(['mg/L', 'µg/mL', 'ng/mL'])}",
    "auc_val": lambda rng: f"{rng.uniform(4, 980):.0f} {rng.choice(['mg·h/L', 'ng·h/mL', 'µg·h/mL'])}",
    "tmax_val": lambda rng: f"{rng.choice(['0.5', '1.0', '1.5', '2.0', '3.0', '4.0', '6.0'])} h",
    "iiv": _int(18, 64),
    "auc_target": lambda rng: rng.choice(["400–600 mg·h/L", "AUC/MIC ≥ 400", "5–15 ng/mL", "fT>MIC ≥ 40%"]),
    "md": lambda rng: (
        f"{rng.uniform(-1.8, -0.2):.2f} (95% CI {rng.uniform(-2.6, -1.9):.2f} to {rng.uniform(-0.19, -0.02):.2f})"
    ),
    "software": ["NONMEM 7.5", "Monolix 2023R1", "nlmixr2", "Simcyp Simulator v22", "PK-Sim", "Phoenix WinNonlin 8.3"],
    "year": _int(2008, 2023),
    "country": [
        "the United States",
        "Canada",
        "Germany",
        "Japan",
        "the Netherlands",
        "Australia",
        "Spain",
        "South Korea",
        "Brazil",
        "Denmark",
        "the United Kingdom",
        "France",
        "Italy",
        "China",
    ],
    "surname": LAST_NAMES,
}

BACKGROUND = [
    "{drug} is a {drug_class} widely used for the treatment of {condition}.",
    "{drug} is a substrate of {enzyme}, and its exposure is therefore susceptible to drug–drug interactions.",
    "Data on the pharmacokinetics of {drug} in {population} are limited.",
    "Current labelling recommends {dose} {regimen}, but the evidence supporting this regimen in {population} is sparse.",
    "Interindividual variability in {drug} exposure is substantial and may contribute to treatment failure or toxicity.",
    "Therapeutic drug monitoring of {drug} is recommended, yet the optimal target for {outcome} remains uncertain.",
    "Whether {covariate} explains the variability in {drug} clearance has not been established.",
    "Concomitant use of {inhibitor}, a strong {enzyme} inhibitor, is common in clinical practice.",
    "Co-administration with {inducer} may reduce {drug} exposure and compromise efficacy.",
    "Previous studies of {drug} in {condition} reported conflicting results for {outcome}.",
    "The clinical relevance of {cyp} genetic polymorphisms for {drug} dosing is debated.",
    "Dose adjustment of {drug} in renal impairment is based largely on small single-dose studies.",
    "Off-label use of {drug} in {population} has increased over the past decade.",
    "{drug} has a narrow therapeutic index, and small changes in exposure may have clinical consequences.",
    "Obesity alters the volume of distribution of many lipophilic drugs, but its effect on {drug} is poorly characterized.",
]
OBJECTIVE = [
    "We aimed to characterize the pharmacokinetics of {drug} in {population}.",
    "This study evaluated the effect of {inhibitor} on the pharmacokinetics of {drug}.",
    "The objective was to compare {drug} with {comparator} with respect to {outcome}.",
    "We therefore developed a population pharmacokinetic model to support dose selection in {population}.",
    "Our aim was to quantify the effect of {covariate} on {drug} exposure and to propose a dosing regimen.",
    "We assessed the association between {drug} exposure and {outcome} in routine care.",
]
METHODS = [
    "We conducted {design} in {population}.",
    "We conducted {design} at {n_small} centres in {country}.",
    "A total of {n} participants were randomized to {drug} {dose} {regimen} or {comparator} for {weeks}.",
    "Participants received {drug} {dose} {regimen} alone and again after {n_small} days of {inhibitor} pretreatment.",
    "Serial blood samples were collected up to {n_small} h after dosing, and plasma concentrations were measured by validated LC-MS/MS.",
    "Pharmacokinetic parameters were estimated by non-compartmental analysis in {software}.",
    "Nonlinear mixed-effects modelling was performed with {software}, and covariates were tested by stepwise forward inclusion and backward elimination.",
    "Children received {mgkg} of {drug} {regimen}, with the dose capped at {dose}.",
    "The primary endpoint was {outcome}; secondary endpoints included {pk} and the incidence of {adverse}.",
    "Monte Carlo simulations ({n} virtual patients) were used to estimate the probability of target attainment for {auc_target}.",
    "Geometric mean ratios of {pk} with and without the interacting drug were calculated with 90% confidence intervals.",
    "Hazard ratios were estimated with Cox proportional hazards models adjusted for age, sex and {covariate}.",
    "Trough concentrations were measured at steady state, and dose adjustments followed a prespecified algorithm.",
    "Genotyping for {cyp} variants was performed in all participants who gave additional consent.",
    "Data from {n} patients treated between {year} and 2024 were extracted from electronic health records.",
    "Model evaluation included visual predictive checks, bootstrap analysis and normalized prediction distribution errors.",
]
RESULTS = [
    "Co-administration of {inhibitor} increased {drug} {pk} by {fold}.",
    "{inducer} decreased {drug} {pk} by {pct}% (p < 0.001).",
    "The geometric mean ratio for {pk} was {gmr}, within the prespecified bioequivalence limits.",
    "The mean terminal half-life was {half_life}, and apparent clearance was {clearance}.",
    "Median Tmax was {tmax_val}, and mean Cmax was {cmax_val}.",
    "Mean AUC0–∞ was {auc_val}, with a coefficient of variation of {iiv}%.",
    "A two-compartment model with first-order absorption and lag time best described the data.",
    "{covariate} was the most important covariate, explaining {pct_small}% of the between-subject variability in clearance.",
    "Between-subject variability in clearance was {iiv}%.",
    "The between-group comparison for {outcome} favoured {drug} over {comparator} ({hr}).",
    "The difference in {outcome} between {drug} and {comparator} was estimated as {hr}.",
    "Higher exposure was associated with {outcome} ({or}).",
    "The mean difference in {outcome} was {md} (p < 0.01).",
    "{adverse} was the most frequent adverse event, reported in {pct_small}% of participants receiving {drug} and {pct_small}% receiving {comparator}.",
    "No serious adverse events related to study drug were reported.",
    "Only {pct}% of patients achieved the target {pks} with the standard regimen, compared with {pct}% with the model-based regimen.",
    "Simulations indicated that {dose} {regimen} would achieve target exposure in more than 90% of {population}.",
    "{cyp} poor metabolizers had {fold} higher exposure than normal metabolizers ({p}).",
    "Exposure was {pct}% lower in patients with augmented renal clearance ({p}).",
    "Treatment discontinuation due to {adverse} occurred in {pct_small}% of participants ({rr}).",
]
CONCLUSIONS = [
    "{drug} exposure is substantially increased by {inhibitor}, and co-administration should be avoided or the dose reduced.",
    "A dose of {dose} {regimen} is appropriate for {population}.",
    "{covariate}-based dosing of {drug} may improve target attainment and should be evaluated prospectively.",
    "These findings support therapeutic drug monitoring of {drug} in {population}.",
    "{drug} was well tolerated and compared favourably with {comparator} for {outcome}.",
    "No dose adjustment of {drug} appears necessary in {population}.",
    "The interaction with {inducer} is clinically relevant, and alternative therapy should be considered.",
    "Larger prospective studies are needed to confirm the exposure–response relationship for {outcome}.",
    "Model-informed precision dosing could reduce the variability in {drug} exposure observed in routine practice.",
    "Pharmacogenetic testing for {cyp} may help to individualize {drug} therapy.",
    "Clinicians should be aware of the increased risk of {adverse} when {drug} is combined with {inhibitor}.",
]
SECTION_NAMES = {
    "background": ["Background"] * 8 + ["Introduction", "Aims", "Objective"],
    "methods": ["Methods"] * 8 + ["Patients and methods", "Design", "Study design"],
    "results": ["Results"] * 9 + ["Findings"],
    "conclusions": ["Conclusions"] * 7 + ["Conclusion", "Interpretation"],
}


# Which conditions each drug is plausibly studied in, so an abstract does not pair an antibiotic with depression.
THERAPEUTIC_AREAS = [
    (
        "atorvastatin rosuvastatin simvastatin amlodipine lisinopril losartan valsartan metoprolol carvedilol digoxin amiodarone furosemide spironolactone",
        [
            "essential hypertension",
            "heart failure with reduced ejection fraction",
            "atrial fibrillation",
            "hypercholesterolaemia",
            "acute coronary syndrome",
            "chronic kidney disease",
        ],
        [
            "major adverse cardiovascular events",
            "hospitalization for heart failure",
            "all-cause mortality",
            "change from baseline in systolic blood pressure",
            "LDL cholesterol at week 12",
        ],
    ),
    (
        "metformin sitagliptin empagliflozin dapagliflozin semaglutide liraglutide insulin-glargine levothyroxine allopurinol colchicine",
        [
            "type 2 diabetes mellitus",
            "obesity",
            "chronic kidney disease",
            "hypothyroidism",
            "gout",
            "heart failure with reduced ejection fraction",
        ],
        [
            "change from baseline in HbA1c",
            "body weight at week 52",
            "serum urate below 6 mg/dL",
            "hypoglycaemia",
            "TSH within the reference range",
        ],
    ),
    (
        "warfarin apixaban rivaroxaban dabigatran-etexilate clopidogrel ticagrelor",
        ["atrial fibrillation", "venous thromboembolism", "acute coronary syndrome"],
        [
            "major bleeding",
            "clinically relevant non-major bleeding",
            "symptomatic venous thromboembolism",
            "stroke or systemic embolism",
        ],
    ),
    (
        "midazolam alprazolam sertraline escitalopram venlafaxine quetiapine olanzapine aripiprazole lithium-carbonate valproic-acid levetiracetam carbamazepine lamotrigine phenytoin",
        [
            "major depressive disorder",
            "generalized anxiety disorder",
            "schizophrenia",
            "bipolar I disorder",
            "focal epilepsy",
        ],
        ["response on the MADRS scale", "seizure freedom", "relapse within 12 months", "sedation depth"],
    ),
    (
        "morphine oxycodone fentanyl tramadol ibuprofen celecoxib",
        ["chronic low back pain", "postoperative pain", "osteoarthritis of the knee", "rheumatoid arthritis"],
        [
            "pain intensity on a 0–10 numeric rating scale",
            "rescue analgesic use",
            "opioid-induced respiratory depression",
        ],
    ),
    (
        "vancomycin gentamicin amikacin ceftriaxone meropenem piperacillin-tazobactam ciprofloxacin levofloxacin linezolid fluconazole voriconazole posaconazole dolutegravir tenofovir-alafenamide nirmatrelvir",
        [
            "community-acquired pneumonia",
            "complicated urinary tract infection",
            "sepsis",
            "invasive aspergillosis",
            "HIV-1 infection",
            "chronic hepatitis B",
            "COVID-19",
        ],
        [
            "clinical cure",
            "target attainment (fT>MIC of 100%)",
            "sustained virological response",
            "time to clinical recovery",
            "acute kidney injury",
            "30-day mortality",
        ],
    ),
    (
        "tacrolimus cyclosporine mycophenolate-mofetil sirolimus methotrexate adalimumab infliximab prednisolone dexamethasone",
        [
            "rheumatoid arthritis",
            "Crohn's disease",
            "ulcerative colitis",
            "plaque psoriasis",
            "asthma",
            "chronic obstructive pulmonary disease",
            "kidney transplant rejection",
        ],
        [
            "clinical remission at week 12",
            "biopsy-proven acute rejection",
            "disease activity (DAS28)",
            "exacerbation rate",
        ],
    ),
    (
        "imatinib ibrutinib osimertinib pembrolizumab nivolumab trastuzumab everolimus",
        [
            "non-small cell lung cancer",
            "chronic myeloid leukaemia",
            "HER2-positive breast cancer",
            "chronic lymphocytic leukaemia",
            "metastatic melanoma",
        ],
        ["progression-free survival", "overall survival", "objective response rate", "grade 3 or higher neutropenia"],
    ),
    (
        "omeprazole pantoprazole ondansetron",
        ["gastro-oesophageal reflux disease", "chemotherapy-induced nausea"],
        ["symptom resolution at week 4", "complete response (no emesis) in the first 24 h"],
    ),
]
DRUG_AREAS = {
    drug.replace("-", " ") if drug != "piperacillin-tazobactam" else drug: (conditions, outcomes)
    for drugs, conditions, outcomes in THERAPEUTIC_AREAS
    for drug in drugs.split()
}


def domain_context(rng: random.Random) -> dict:
    drug, drug_class = rng.choice(DRUGS)
    conditions, outcomes = DRUG_AREAS[drug]
    condition = rng.choice(conditions)
    other = rng.choice([d for d in DRUG_AREAS if DRUG_AREAS[d][0] is conditions and d != drug])
    inhibitor = rng.choice(INHIBITORS)
    return {
        "drug": drug,
        "drug_class": drug_class,
        "comparator": rng.choice(["placebo", "placebo", f"standard-dose {other}", other, "usual care"]),
        "condition": condition,
        "outcome": rng.choice(outcomes),
        "inhibitor": inhibitor,
        "inducer": rng.choice(INDUCERS),
        "enzyme": INHIBITOR_TARGETS[inhibitor],
        "covariate": rng.choice(COVARIATES),
        "population": fill(rng, rng.choice(POPULATIONS), DOMAIN_VOCAB, {"condition": condition}),
    }


def _section(rng: random.Random, templates: list[str], k: int, ctx: dict) -> str:
    return " ".join(tidy(fill(rng, t, DOMAIN_VOCAB, ctx)) for t in rng.sample(templates, k))


def make_abstract(rng: random.Random) -> str:
    while True:
        ctx = domain_context(rng)
        extra = 2 if rng.random() < 0.15 else 0  # a long tail of fuller abstracts, up to ~400 words
        background = (
            _section(rng, BACKGROUND, rng.randint(1, 2 + extra // 2), ctx) + " " + _section(rng, OBJECTIVE, 1, ctx)
        )
        parts = [
            ("background", background),
            ("methods", _section(rng, METHODS, rng.randint(2, 4 + extra), ctx)),
            ("results", _section(rng, RESULTS, rng.randint(2 + extra, 5 + 2 * extra), ctx)),
            ("conclusions", _section(rng, CONCLUSIONS, rng.randint(1, 2), ctx)),
        ]
        text = "\n\n".join(f"{rng.choice(SECTION_NAMES[name])}: {body}" for name, body in parts)
        if 120 <= words(text) <= 400:
            return text


# ---------------------------------------------------------------------------
# Domain guidelines: one plain-text dosing guideline per file
# ---------------------------------------------------------------------------

GUIDELINE_SECTIONS = [
    (
        "Scope",
        [
            "This guideline applies to adults and children treated with {drug} for {condition} in hospital and community settings.",
            "It covers initial dosing, dose adjustment in organ impairment, interacting medicines and monitoring.",
            "It does not replace clinical judgement, and prescribers should consider the individual circumstances of each patient.",
            "The recommendations were reviewed by the Drug and Therapeutics Committee in {year} and are due for review in three years.",
            "Specialist advice should be sought for {population}, for whom evidence is limited.",
        ],
    ),
    (
        "Indications",
        [
            "{drug} is indicated for the treatment of {condition} when first-line therapy is unsuitable or has failed.",
            "Off-label use for {condition} requires approval from the responsible consultant.",
            "{drug} is a {drug_class}; the therapeutic effect is related to sustained exposure rather than peak concentration.",
            "Contraindications include known hypersensitivity and concomitant use of strong {enzyme} inhibitors such as {inhibitor}.",
        ],
    ),
    (
        "Initial dosing",
        [
            "The usual adult starting dose is {dose} {regimen}.",
            "In children, give {mgkg} {regimen}, not exceeding the adult dose of {dose}.",
            "A loading dose of {mgkg} may be given when a rapid effect is required, followed by maintenance dosing {regimen}.",
            "Doses should be based on actual body weight unless the BMI exceeds 30 kg/m², in which case adjusted body weight is used.",
            "Tablets may be taken with or without food; a high-fat meal increases Cmax by about {pct_small}% but does not change AUC.",
            "Round the calculated dose to the nearest practical strength and document the weight used for the calculation.",
        ],
    ),
    (
        "Renal impairment",
        [
            "No adjustment is required when creatinine clearance is 50 mL/min or higher.",
            "If creatinine clearance is 30–49 mL/min, reduce the dose to {dose} {regimen}.",
            "Avoid use when creatinine clearance is < 15 mL/min or in patients receiving dialysis unless advised by a nephrologist.",
            "In patients receiving haemodialysis, give the dose after the dialysis session.",
            "Renal function should be estimated with the Cockcroft-Gault equation, because published dosing studies used this method.",
        ],
    ),
    (
        "Hepatic impairment",
        [
            "No adjustment is needed in mild hepatic impairment (Child-Pugh A).",
            "In moderate hepatic impairment (Child-Pugh B), reduce the maintenance dose by 50% and monitor closely.",
            "Use in severe hepatic impairment (Child-Pugh C) is not recommended because exposure increased {fold} in a dedicated study.",
            "Hepatic function tests should be checked at baseline and after four weeks of treatment.",
        ],
    ),
    (
        "Drug interactions",
        [
            "{drug} is a substrate of {enzyme}; strong inhibitors such as {inhibitor} increase exposure and should be avoided.",
            "Strong inducers such as {inducer} reduce {drug} exposure by up to {pct}%; choose an alternative where possible.",
            "If co-administration with {inhibitor} cannot be avoided, reduce the dose of {drug} to {dose} {regimen} and monitor for {adverse}.",
            "After stopping an inducer, enzyme activity returns to baseline over about two weeks, so the dose should be reviewed at that time.",
            "Check every new prescription against the interaction table in the local formulary.",
        ],
    ),
    (
        "Monitoring",
        [
            "Measure trough concentrations at steady state, usually after five half-lives, and before the next dose.",
            "The exposure target is {auc_target} for most indications.",
            "Monitor full blood count, renal function and electrolytes at baseline and every {weeks} thereafter.",
            "Patients should be advised to report {adverse} or {adverse2} promptly.",
            "Document each concentration result with the time of the last dose and the time of sampling.",
            "If the concentration is above the target range, withhold one dose and reduce the daily dose by 25%.",
        ],
    ),
    (
        "Switching and stopping",
        [
            "When switching from intravenous to oral therapy, give the first oral dose when the next intravenous dose would have been due.",
            "Do not stop {drug} abruptly after long-term use; reduce the dose gradually over {weeks}.",
            "If a dose is missed, take it as soon as remembered unless the next dose is due within six hours.",
        ],
    ),
]


def make_guideline(rng: random.Random, number: int) -> tuple[str, str]:
    ctx = domain_context(rng)
    title = f"{ctx['drug'].capitalize()} dosing guideline: {ctx['condition']}"
    lines = [
        title,
        "=" * len(title),
        "",
        f"Document number: CPG-{number:03d}    Version {rng.randint(1, 6)}.{rng.randint(0, 9)}    Approved {fill(rng, '{year}', DOMAIN_VOCAB)}",
        "",
    ]
    for index, (heading, templates) in enumerate(GUIDELINE_SECTIONS, start=1):
        if heading == "Switching and stopping" and rng.random() < 0.5:
            continue
        k = min(len(templates), rng.randint(2, 4))
        lines += [
            f"{index}. {heading}",
            "",
            " ".join(tidy(fill(rng, t, DOMAIN_VOCAB, ctx)) for t in rng.sample(templates, k)),
            "",
        ]
    lines += ["References", ""]
    for ref in range(rng.randint(2, 4)):
        lines.append(
            f"{ref + 1}. {rng.choice(LAST_NAMES)} {rng.choice('ABCDEFGHJKLMNPRS')}, et al. {rng.choice(JOURNALS)}. {rng.randint(2009, 2024)};{rng.randint(12, 118)}:{rng.randint(101, 2999)}."
        )
    slug = re.sub(r"[^a-z0-9]+", "-", ctx["drug"].lower()).strip("-")
    return f"guideline-{number:02d}-{slug}.txt", "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# General web text: everyday English from topic word lists and grammar templates
# ---------------------------------------------------------------------------

SHARED_VOCAB = {
    "name": FIRST_NAMES,
    "friend": [
        "my neighbor",
        "my sister",
        "a coworker",
        "my brother-in-law",
        "an old friend from college",
        "my partner",
        "my dad",
        "a reader named {name}",
        "my aunt",
        "a friend of mine",
        "my roommate",
        "a guy at the local shop",
    ],
    "city": [
        "Portland",
        "Denver",
        "Austin",
        "Chicago",
        "Boston",
        "Seattle",
        "Atlanta",
        "Minneapolis",
        "Nashville",
        "San Diego",
        "Pittsburgh",
        "Toronto",
        "Manchester",
        "Dublin",
        "Melbourne",
        "Edinburgh",
        "Vancouver",
        "Phoenix",
        "Raleigh",
        "Cleveland",
    ],
    "time_ago": [
        "last spring",
        "a few weeks ago",
        "two summers ago",
        "back in March",
        "last weekend",
        "a couple of years ago",
        "earlier this month",
        "over the holidays",
        "when I was in my twenties",
        "last fall",
        "this past winter",
    ],
    "season": ["spring", "summer", "fall", "winter", "early spring", "late summer", "the holiday season"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "adj": [
        "surprisingly simple",
        "a little frustrating",
        "more rewarding than I expected",
        "completely worth it",
        "harder than it looks",
        "oddly relaxing",
        "cheaper than I thought",
        "a bit overwhelming at first",
        "genuinely fun",
        "easy to get wrong",
    ],
    "good": ["great", "solid", "reliable", "excellent", "decent", "fantastic", "sturdy", "clever", "handy", "lovely"],
    "feeling": [
        "proud",
        "relieved",
        "a bit nervous",
        "excited",
        "exhausted but happy",
        "skeptical",
        "pleasantly surprised",
        "hooked",
    ],
    "num_word": ["two", "three", "four", "five", "six", "seven", "ten", "a dozen"],
    "minutes": ["five", "ten", "fifteen", "twenty", "thirty", "forty-five"],
    "money": ["$15", "$20", "$35", "$50", "$80", "$120", "$200", "$300", "about forty bucks", "less than ten dollars"],
    "opinion": [
        "honestly",
        "to be fair",
        "in my experience",
        "for what it's worth",
        "if you ask me",
        "looking back",
        "all things considered",
    ],
}

SHARED_TEMPLATES = [
    "A lot of people ask me whether {activity} is worth the effort, and my answer is always the same: start small and be patient.",
    "When I first got into {activity}, I made almost every mistake you can imagine.",
    "Here is a tip that saved me a lot of time: {tip}.",
    "If you only remember one thing from this post, make it this: {tip}.",
    "{opinion}, {activity} turned out to be {adj}.",
    "{friend} got me started {time_ago}, and I have not looked back since.",
    "One thing nobody tells you is that {fact}.",
    "It took me a while to figure out that {fact}.",
    "The biggest problem most beginners run into is that {problem}.",
    "If you notice that {problem}, don't panic; it happens to everyone.",
    "I picked up a {tool} for {money}, and it has been {good} ever since.",
    "You don't need an expensive {tool} to get started, but a {good} one makes a real difference.",
    "My favorite part of the week is {weekday} morning, when I finally have time for {activity}.",
    "We tried this in {city} {time_ago}, and the results were {adj}.",
    "I was {feeling} the first time I tried {activity} on my own.",
    "Some people will tell you to skip this step, but {opinion}, {tip}.",
    "After {num_word} years of {activity}, I still learn something new almost every week.",
    "The {thing} is where most of the magic happens, so give it your full attention.",
    "Don't be afraid to experiment with the {thing}; that is how you find out what works for you.",
    "{friend} asked me about the {thing} last week, so I thought I would write up everything I know.",
    "I keep a small notebook of what works and what doesn't, and it has been a huge help for tracking progress.",
    "There is no single right way to do this, and anyone who says otherwise is probably selling something.",
    "Let me know in the comments how it goes for you.",
    "This post is a little longer than usual, so grab a coffee.",
    "In the end, {activity} is about enjoying the process, not just the result.",
    "I get this question a lot, so here is the short answer.",
    "Over time, I realized that {fact}.",
    "{season} is a {good} time to try this, because {fact}.",
    "Before you start, make sure the {tool} is clean and within easy reach.",
    "A quick word of warning: {problem} more often than you would think.",
    "The first attempt rarely goes perfectly, and that is completely normal.",
    "I have linked a few of my older posts below in case you want to dig deeper.",
    "It sounds complicated, but once you have done it {num_word} times it becomes second nature.",
    "Most of the advice online overcomplicates things, so I will keep this simple.",
    "{name} from {city} emailed me to say that {fact}, which matches what I have seen.",
]

TOPICS = {
    "cooking": {
        "site": ["www.weeknightkitchen.com", "homecookingnotes.net", "www.thesimmeringpot.com"],
        "path": ["recipes", "blog", "kitchen-tips"],
        "thing": [
            "sauce",
            "dough",
            "marinade",
            "broth",
            "spice mix",
            "batter",
            "pan sauce",
            "pie crust",
            "roux",
            "salad dressing",
            "risotto",
            "braise",
            "stir-fry",
            "sourdough starter",
            "pot of chili",
        ],
        "dish": [
            "lemon garlic chicken",
            "roasted vegetable soup",
            "banana bread",
            "vegetable curry",
            "mushroom risotto",
            "black bean tacos",
            "beef stew",
            "sheet-pan salmon",
            "homemade pizza",
            "chocolate chip cookies",
            "shakshuka",
            "apple crumble",
            "pad thai",
            "tomato basil pasta",
            "chicken noodle soup",
            "cornbread",
            "lentil salad",
        ],
        "ingredient": [
            "garlic",
            "fresh ginger",
            "smoked paprika",
            "brown butter",
            "lemon zest",
            "fresh thyme",
            "cumin",
            "parmesan",
            "shallots",
            "olive oil",
            "soy sauce",
            "maple syrup",
            "fresh cilantro",
            "chili flakes",
            "a splash of vinegar",
            "coconut milk",
        ],
        "activity": [
            "cooking at home",
            "baking bread",
            "meal prepping",
            "cooking for a crowd",
            "learning to cook without recipes",
            "making soup from scratch",
        ],
        "tool": [
            "cast-iron skillet",
            "chef's knife",
            "Dutch oven",
            "digital scale",
            "wooden spoon",
            "sheet pan",
            "instant-read thermometer",
            "stand mixer",
            "microplane",
            "food processor",
        ],
        "tip": [
            "salt your pasta water more than you think you should",
            "let the meat rest before you slice it",
            "taste as you go and adjust the seasoning at the end",
            "toast your spices in a dry pan before using them",
            "read the whole recipe before you turn on the stove",
            "pat the chicken dry so it browns instead of steaming",
            "keep a bowl for scraps next to your cutting board",
            "add a little acid, like lemon juice or vinegar, when a dish tastes flat",
        ],
        "fact": [
            "most home ovens run hotter or cooler than the dial says",
            "a sharp knife is actually safer than a dull one",
            "onions take much longer to caramelize than most recipes admit",
            "bread dough rises faster in a warm kitchen",
            "fresh herbs lose their flavor if you add them too early",
            "a heavy pan holds heat far better than a thin one",
        ],
        "problem": [
            "the sauce breaks and turns greasy",
            "the bottom of the pan starts to burn",
            "the dough stays sticky no matter how much you knead it",
            "the vegetables come out soggy",
            "the cake sinks in the middle",
        ],
        "title": [
            "The Easiest {dish} You Will Ever Make",
            "How I Make {dish} on a Busy Weeknight",
            "{num_word} Mistakes to Avoid When {activity}",
            "Why {ingredient} Belongs in Your {dish}",
            "A Beginner's Guide to {activity}",
        ],
        "sents": [
            "This {dish} comes together in about {minutes} minutes, which makes it perfect for a weeknight.",
            "Start by warming the olive oil over medium heat, then add the {ingredient} and stir for a minute until fragrant.",
            "I like to finish the {dish} with {ingredient} and a pinch of flaky salt.",
            "If you can't find {ingredient}, {ingredient2} works just as well.",
            "My kids usually ask for seconds whenever I make {dish}.",
            "Leftovers keep in the fridge for up to four days, and the flavor actually improves overnight.",
            "The secret to a good {thing} is patience; don't rush it.",
            "Preheat the oven to 400 degrees and line a baking sheet with parchment paper.",
            "Chop the vegetables into roughly even pieces so they cook at the same rate.",
            "Simmer gently, stirring every few minutes, until the {thing} thickens enough to coat the back of a spoon.",
            "I first had {dish} at a tiny restaurant in {city}, and I have been trying to recreate it ever since.",
            "Serve it with crusty bread, a simple green salad, or over a bowl of rice.",
            "Double the recipe and freeze half; future you will be grateful.",
        ],
    },
    "travel": {
        "site": ["www.slowtraveljournal.com", "carryonandgo.net", "www.weekendwanderers.org"],
        "path": ["destinations", "travel-tips", "itineraries"],
        "thing": [
            "itinerary",
            "packing list",
            "travel budget",
            "day trip",
            "train journey",
            "road trip",
            "layover",
            "walking tour",
        ],
        "destination": [
            "Lisbon",
            "Kyoto",
            "the Scottish Highlands",
            "Mexico City",
            "Vancouver Island",
            "the Amalfi Coast",
            "Prague",
            "Seoul",
            "Iceland's Ring Road",
            "New Orleans",
            "Patagonia",
            "the Lake District",
            "Marrakech",
            "Copenhagen",
            "Vietnam",
            "Yellowstone",
        ],
        "activity": [
            "traveling on a budget",
            "traveling with only a carry-on",
            "planning a road trip",
            "solo travel",
            "traveling with kids",
            "booking trips off-season",
        ],
        "tool": [
            "packing cube",
            "carry-on backpack",
            "portable charger",
            "travel pillow",
            "reusable water bottle",
            "rain jacket",
            "pair of walking shoes",
            "universal adapter",
        ],
        "tip": [
            "book train tickets a few weeks in advance",
            "always keep a photocopy of your passport somewhere separate",
            "eat where the locals eat, usually a street or two away from the main square",
            "pack half the clothes you think you need",
            "learn a few words of the local language before you go",
            "check whether your bank charges foreign transaction fees",
        ],
        "fact": [
            "flights on Tuesdays and Wednesdays are often cheaper",
            "many museums are free on the first Sunday of the month",
            "the shoulder season has better prices and fewer crowds",
            "public transport is usually faster than taxis in big cities",
            "most hostels now have private rooms as well as dorms",
        ],
        "problem": [
            "your luggage doesn't show up at the carousel",
            "your connecting flight is delayed",
            "the hotel loses your reservation",
            "you arrive somewhere and everything is closed for a holiday",
            "the rental car has a flat tire",
        ],
        "title": [
            "{num_word} Days in {destination}: A Complete Itinerary",
            "What I Wish I Knew Before Visiting {destination}",
            "How to Spend a Weekend in {destination} Without Breaking the Bank",
            "My Honest Review of {destination}",
            "A Slow Traveler's Guide to {destination}",
        ],
        "sents": [
            "We spent {num_word} days in {destination} {time_ago}, and it was not nearly enough.",
            "The best meal of the whole trip was a tiny family-run place near the train station in {destination}.",
            "Getting around {destination} is easy if you buy a multi-day transit pass.",
            "We stayed in a small guesthouse run by a retired couple, and they gave us the best recommendations.",
            "If you only have one day, skip the crowded highlights and just wander the old neighborhoods.",
            "The weather changed three times in one afternoon, so bring layers.",
            "Compared with {destination2}, {destination} felt calmer and a lot more affordable.",
            "Sunrise from the hill above town was worth the early alarm.",
            "I budgeted around {money} a day, not counting accommodation.",
            "The locals were incredibly patient with my terrible attempts at the language.",
            "Next time I would fly into {destination2} instead and take the train from there.",
            "Most of the sights are within walking distance, so comfortable shoes matter more than a car.",
        ],
    },
    "gardening": {
        "site": ["www.greenthumbdiary.net", "backyardharvest.org", "www.smallspacegardener.com"],
        "path": ["garden", "how-to", "vegetables"],
        "thing": [
            "soil",
            "compost",
            "seedling",
            "raised bed",
            "mulch",
            "potting mix",
            "vegetable patch",
            "herb garden",
            "flower border",
            "watering schedule",
        ],
        "plant": [
            "tomatoes",
            "zucchini",
            "basil",
            "lavender",
            "sunflowers",
            "garlic",
            "strawberries",
            "peppers",
            "lettuce",
            "hydrangeas",
            "roses",
            "potatoes",
            "runner beans",
            "rosemary",
            "dahlias",
            "blueberries",
            "cucumbers",
            "kale",
        ],
        "activity": [
            "gardening",
            "growing vegetables in containers",
            "composting",
            "starting seeds indoors",
            "growing herbs on a balcony",
            "keeping a small orchard",
        ],
        "tool": [
            "hand trowel",
            "pair of pruning shears",
            "watering can",
            "soil thermometer",
            "garden fork",
            "hose with a soaker attachment",
            "wheelbarrow",
            "kneeling pad",
        ],
        "tip": [
            "water deeply and less often instead of a little every day",
            "add a thick layer of mulch to keep the soil moist",
            "rotate your crops so the same family isn't in the same bed two years in a row",
            "harden off seedlings for a week before planting them out",
            "pick herbs often, because it encourages new growth",
            "test your soil before adding fertilizer",
        ],
        "fact": [
            "most vegetables need at least six hours of direct sun",
            "coffee grounds are fine in compost but not a miracle fertilizer",
            "clay soil holds nutrients well but drains slowly",
            "marigolds help attract pollinators to a vegetable bed",
            "overwatering kills more houseplants than underwatering",
        ],
        "problem": [
            "the leaves start turning yellow from the bottom up",
            "aphids take over the new growth",
            "slugs eat the seedlings overnight",
            "the plants get tall and leggy",
            "the fruit cracks after heavy rain",
        ],
        "title": [
            "How to Grow {plant} in Small Spaces",
            "{num_word} Easy Plants for a First Vegetable Garden",
            "What I Learned From My First Year Growing {plant}",
            "A Simple Guide to {activity}",
            "Why Your {plant} Aren't Thriving (and How to Fix It)",
        ],
        "sents": [
            "This year I finally had a decent crop of {plant}, after {num_word} seasons of trial and error.",
            "I sow {plant} indoors in late winter and move them outside once the nights stay above 50 degrees.",
            "{plant} and {plant2} grow happily side by side, so I often plant them in the same bed.",
            "My raised beds are filled with a mix of topsoil, compost and a little sand.",
            "The bees were all over the {plant} by the middle of July.",
            "If your {thing} feels dry an inch below the surface, it is time to water.",
            "We lost most of the {plant} to an early frost {time_ago}, which taught me to keep an eye on the forecast.",
            "A simple drip line on a timer has saved me hours every week.",
            "Pinch off the first flowers so the plant puts its energy into roots and leaves.",
            "By late summer the garden was producing more {plant} than we could eat, so we started giving them away.",
            "Old newspaper under the mulch is a cheap way to smother weeds.",
        ],
    },
    "fitness": {
        "site": ["www.everydayathlete.com", "runstrongblog.net", "www.homeworkoutlab.com"],
        "path": ["training", "running", "workouts"],
        "thing": [
            "warm-up",
            "training plan",
            "long run",
            "recovery day",
            "stretching routine",
            "interval session",
            "strength workout",
            "cool-down",
        ],
        "sport": [
            "running",
            "cycling",
            "swimming",
            "rock climbing",
            "yoga",
            "tennis",
            "basketball",
            "soccer",
            "rowing",
            "hiking",
            "weightlifting",
            "pickleball",
        ],
        "activity": [
            "training for a half marathon",
            "working out at home",
            "getting back into running",
            "lifting weights",
            "playing in a weekend league",
            "stretching every day",
        ],
        "tool": [
            "foam roller",
            "pair of running shoes",
            "jump rope",
            "set of adjustable dumbbells",
            "heart rate monitor",
            "yoga mat",
            "resistance band",
            "kettlebell",
        ],
        "tip": [
            "increase your weekly mileage by no more than ten percent",
            "sleep is the most underrated part of any training plan",
            "warm up for at least ten minutes before hard efforts",
            "eat something with protein within an hour of a hard workout",
            "run most of your miles at an easy, conversational pace",
            "focus on form before adding weight",
        ],
        "fact": [
            "muscles actually grow during rest, not during the workout",
            "consistency beats intensity over the long run",
            "strength training helps prevent running injuries",
            "staying hydrated makes a bigger difference in summer than most people expect",
            "a short walk after meals helps with recovery",
        ],
        "problem": [
            "your knees start aching after long runs",
            "you hit a plateau and stop making progress",
            "you feel tired all the time",
            "motivation drops off after a few weeks",
            "you get shin splints",
        ],
        "title": [
            "How I Trained for My First Half Marathon",
            "{num_word} Simple Exercises You Can Do at Home",
            "A Beginner's Guide to {sport}",
            "What {num_word} Months of {activity} Taught Me",
            "Why Rest Days Matter More Than You Think",
        ],
        "sents": [
            "I started {sport} at the age of forty, and it is the best decision I have made for my health.",
            "Our local {sport} club meets every {weekday} evening, and beginners are always welcome.",
            "The first two weeks were rough, but by week three I could feel the difference.",
            "I finished the race in just under two hours, which was ten minutes faster than my goal.",
            "Three sets of twelve squats, lunges and push-ups make a surprisingly good workout.",
            "Our team lost the final by a single point, but it was the most fun season we have had.",
            "The coach kept reminding us that the {thing} is not optional.",
            "I alternate {sport} with {sport2} so I don't get bored or overuse the same muscles.",
            "Some days the best workout is a slow walk around the neighborhood.",
            "The last mile always hurts, and the trick is to keep your shoulders relaxed.",
            "Tracking my runs in a simple spreadsheet helped me see how far I had come.",
        ],
    },
    "history": {
        "site": ["www.pastandpresentblog.com", "historyforcurious.org", "www.oldmapsandstories.net"],
        "path": ["articles", "history", "essays"],
        "thing": [
            "archive",
            "primary source",
            "old newspaper",
            "diary",
            "map",
            "census record",
            "letter",
            "photograph",
        ],
        "era": [
            "the Roman Empire",
            "medieval England",
            "the Renaissance",
            "the Industrial Revolution",
            "the American Civil War",
            "the Victorian era",
            "the Great Depression",
            "the Second World War",
            "ancient Egypt",
            "the Ming dynasty",
            "the age of exploration",
            "the Cold War",
            "the Ottoman Empire",
            "the Gold Rush",
        ],
        "activity": [
            "researching local history",
            "tracing family history",
            "visiting historic sites",
            "reading old letters",
            "collecting old maps",
        ],
        "tool": [
            "library card",
            "magnifying glass",
            "subscription to a newspaper archive",
            "pair of cotton gloves",
            "notebook",
        ],
        "tip": [
            "always check when and by whom a source was written",
            "start with what your own family already knows",
            "visit your local historical society, because the volunteers know everything",
            "compare at least two accounts of the same event",
            "write down where you found each fact",
        ],
        "fact": [
            "most people in the past never traveled more than twenty miles from home",
            "spelling was not standardized until fairly recently",
            "many famous quotes were never actually said by the people they are credited to",
            "ordinary people's letters often tell us more than official records",
            "the calendar itself has changed more than once",
        ],
        "problem": [
            "two sources give completely different dates for the same event",
            "the records you need were lost in a fire",
            "the handwriting is almost impossible to read",
            "a family story turns out to be a myth",
        ],
        "title": [
            "What Daily Life Was Really Like in {era}",
            "{num_word} Myths About {era} That Just Won't Die",
            "A Short History of {thing}s",
            "The Forgotten Story of Our Town's Railway",
            "How {era} Shaped the World We Live In",
        ],
        "sents": [
            "During {era}, ordinary families spent a large share of their income on bread.",
            "Historians still argue about why {era} ended the way it did.",
            "The town grew rapidly after the railway arrived in 1872.",
            "Letters from this period reveal a surprising amount about everyday worries, from the price of coal to the weather.",
            "Many of the buildings on Main Street date back to the 1890s, although most have been altered since.",
            "Life expectancy was low, mostly because so many children died young.",
            "Trade routes connected cities that were thousands of miles apart.",
            "Compared with {era2}, {era} left behind far fewer written records.",
            "The museum has a small but fascinating collection of tools from {era}.",
            "My great-grandmother kept a diary through the 1930s, and reading it felt like opening a time capsule.",
            "It is easy to judge people from the past, but they were dealing with very different circumstances.",
        ],
    },
    "finance": {
        "site": ["www.plainmoneyblog.com", "budgetwithbeth.net", "www.frugalfamilyfinance.com"],
        "path": ["money", "budgeting", "investing"],
        "thing": [
            "budget",
            "emergency fund",
            "retirement account",
            "credit score",
            "savings goal",
            "grocery budget",
            "spending plan",
            "index fund",
        ],
        "activity": [
            "budgeting",
            "paying off debt",
            "saving for a house",
            "investing for retirement",
            "cutting monthly expenses",
            "tracking spending",
        ],
        "tool": [
            "budgeting app",
            "simple spreadsheet",
            "high-yield savings account",
            "envelope system",
            "price comparison site",
        ],
        "tip": [
            "pay yourself first by moving money to savings on payday",
            "cancel the subscriptions you forgot you had",
            "keep three to six months of expenses in an emergency fund",
            "pay off the highest-interest debt first",
            "automate your bills so you never miss a payment",
            "wait forty-eight hours before any purchase over {money}",
        ],
        "fact": [
            "small recurring expenses add up faster than big one-time purchases",
            "low-cost index funds beat most actively managed funds over time",
            "credit card interest can double a debt in a few years",
            "most people underestimate how much they spend on food",
            "your credit score depends heavily on paying on time",
        ],
        "problem": [
            "an unexpected car repair wipes out your savings",
            "you go over budget every single month",
            "a subscription quietly renews at a higher price",
            "your paycheck is irregular",
            "you lose track of where the money goes",
        ],
        "title": [
            "How We Paid Off $30,000 in Debt in Three Years",
            "{num_word} Easy Ways to Cut Your Grocery Bill",
            "A No-Nonsense Guide to {activity}",
            "Why Every Family Needs an Emergency Fund",
            "What I Learned From Tracking Every Dollar for a Year",
        ],
        "sents": [
            "We sat down {time_ago} and went through every bank statement line by line.",
            "The first month of budgeting was humbling, because we were spending almost {money} a week on takeout.",
            "A budget is not about restriction; it is about deciding where your money goes before it disappears.",
            "Once the emergency fund was in place, unexpected bills stopped feeling like emergencies.",
            "We switched to buying store brands and barely noticed the difference.",
            "Every dollar of debt we paid off felt like a small win.",
            "I check our spending every {weekday} evening; it only takes ten minutes.",
            "Retirement feels far away, but starting early makes a huge difference thanks to compound interest.",
            "We set aside {money} a month for fun money, no questions asked.",
            "Talking openly about money with my partner was awkward at first, but it brought us closer.",
            "This is not financial advice, just what worked for our family.",
        ],
    },
    "technology": {
        "site": ["www.everydaytechhelp.com", "gadgetsimplified.net", "www.homelabnotes.dev"],
        "path": ["guides", "reviews", "how-to"],
        "thing": [
            "password manager",
            "backup",
            "home network",
            "laptop battery",
            "browser",
            "router",
            "phone",
            "smart speaker",
            "spreadsheet",
            "operating system update",
        ],
        "device": [
            "laptop",
            "phone",
            "tablet",
            "Wi-Fi router",
            "smartwatch",
            "desktop computer",
            "e-reader",
            "printer",
            "external hard drive",
            "mechanical keyboard",
        ],
        "activity": [
            "setting up a home network",
            "learning to code",
            "backing up family photos",
            "building a PC",
            "going paperless",
            "cleaning up an old laptop",
        ],
        "tool": [
            "USB stick",
            "screwdriver set",
            "password manager",
            "cloud storage plan",
            "label maker",
            "surge protector",
            "external SSD",
        ],
        "tip": [
            "turn on two-factor authentication for your email first",
            "keep at least one backup that is not connected to your computer",
            "restart your router before calling support",
            "use a different password for every account",
            "update your apps regularly, because most updates fix security holes",
            "unplug devices you don't use instead of leaving them on standby",
        ],
        "fact": [
            "most slow laptops just need more memory or fewer startup programs",
            "the cloud is simply someone else's computer",
            "a strong passphrase is easier to remember than a complicated password",
            "old phones make good baby monitors or music players",
            "batteries last longer if you avoid charging them to one hundred percent every night",
        ],
        "problem": [
            "the Wi-Fi keeps dropping in one room",
            "the laptop fan runs constantly",
            "an update fails halfway through",
            "your phone storage is full again",
            "the printer refuses to connect",
        ],
        "title": [
            "How to Speed Up an Old {device}",
            "{num_word} Simple Steps to Protect Your Accounts",
            "A Plain-English Guide to {activity}",
            "Is It Worth Upgrading Your {device}?",
            "What I Learned From {activity}",
        ],
        "sents": [
            "My {device} was five years old and painfully slow, so I tried a few fixes before buying a new one.",
            "Open the settings menu, tap on storage, and see which apps are taking up the most space.",
            "After upgrading the memory, the {device} boots in under thirty seconds.",
            "I set up automatic backups to an external drive and a cloud service, just to be safe.",
            "The new {device} is faster, but honestly the old one was fine for email and browsing.",
            "Tech support told me to turn it off and on again, and annoyingly, it worked.",
            "If the {thing} still misbehaves, a factory reset is the last resort.",
            "I wrote a small script that renames our photos by date, and it saved me hours.",
            "My parents now call me less often with computer questions, which I count as a win.",
            "Most of the features in the premium version are things you will never use.",
            "Moving the router off the floor and away from the microwave fixed most of our problems.",
        ],
    },
    "pets": {
        "site": ["www.happypawsjournal.com", "catsdogsandchaos.net", "www.rescuepetdiaries.org"],
        "path": ["pet-care", "dogs", "cats"],
        "thing": [
            "feeding routine",
            "litter box",
            "leash training",
            "grooming routine",
            "crate",
            "vet visit",
            "daily walk",
            "chew toy",
        ],
        "pet": [
            "rescue dog",
            "senior cat",
            "golden retriever",
            "border collie",
            "tabby cat",
            "rabbit",
            "beagle",
            "pair of guinea pigs",
            "parakeet",
            "German shepherd",
            "kitten",
            "greyhound",
        ],
        "pet_name": [
            "Biscuit",
            "Luna",
            "Max",
            "Pepper",
            "Milo",
            "Daisy",
            "Oscar",
            "Maple",
            "Rocky",
            "Willow",
            "Ziggy",
            "Bean",
        ],
        "activity": [
            "adopting a rescue animal",
            "training a puppy",
            "caring for an older cat",
            "walking two dogs at once",
            "introducing a new pet to the family",
        ],
        "tool": [
            "no-pull harness",
            "puzzle feeder",
            "scratching post",
            "pet camera",
            "slicker brush",
            "travel crate",
            "lick mat",
        ],
        "tip": [
            "reward the behavior you want instead of punishing the behavior you don't",
            "keep training sessions short and end on a success",
            "introduce new food gradually over a week",
            "give a nervous animal a quiet place of its own",
            "brush your pet's teeth a few times a week",
        ],
        "fact": [
            "cats often hide pain very well",
            "many dogs are more afraid of the vet's floor than the vet",
            "a tired dog is usually a well-behaved dog",
            "rabbits need far more space than most people think",
            "older pets benefit from twice-yearly checkups",
        ],
        "problem": [
            "the dog pulls on the leash constantly",
            "the cat stops using the litter box",
            "the new puppy cries all night",
            "your pet refuses to eat",
            "two pets just won't get along",
        ],
        "title": [
            "What Nobody Tells You About {activity}",
            "{num_word} Things I Learned From My {pet}",
            "How We Helped Our {pet} Settle In",
            "A Gentle Guide to {activity}",
            "Meet {pet_name}, Our Very Stubborn {pet}",
        ],
        "sents": [
            "We adopted {pet_name}, a {pet}, from the local shelter {time_ago}.",
            "For the first week, {pet_name} hid under the bed and only came out at night.",
            "{pet_name} has very strong opinions about the mail carrier.",
            "Our vet recommended switching to a food made for older animals.",
            "Every morning at six, {pet_name} sits by the door and stares at me until I get up.",
            "It took about a month before {pet_name} trusted us enough to sleep on the couch.",
            "A long walk before work makes the whole day calmer for everyone.",
            "The {thing} was the hardest part, but patience and treats did the trick.",
            "We added a second {pet} to the family last year, and now they are inseparable.",
            "If you are thinking about adopting, please consider an older animal; they are often overlooked.",
            "{pet_name} got into the trash again last night, so that was a fun start to the day.",
        ],
    },
    "home_repair": {
        "site": ["www.weekenddiyfixes.com", "thehandyhomeowner.net", "www.oldhouserepairs.com"],
        "path": ["diy", "repairs", "projects"],
        "thing": [
            "leaky faucet",
            "squeaky door",
            "drywall patch",
            "running toilet",
            "caulk line",
            "deck",
            "fence post",
            "kitchen cabinet",
            "bathroom fan",
            "clogged drain",
        ],
        "activity": [
            "fixing things around the house",
            "painting a room",
            "renovating an old house",
            "building shelves",
            "refinishing furniture",
            "weatherproofing windows",
        ],
        "tool": [
            "cordless drill",
            "stud finder",
            "putty knife",
            "level",
            "adjustable wrench",
            "caulking gun",
            "utility knife",
            "shop vacuum",
            "tape measure",
            "pry bar",
        ],
        "material": [
            "wood filler",
            "silicone caulk",
            "primer",
            "joint compound",
            "wood glue",
            "sandpaper",
            "painter's tape",
            "deck stain",
            "plumber's tape",
            "drywall screws",
        ],
        "tip": [
            "turn off the water supply before touching any plumbing",
            "measure twice and cut once",
            "always use a primer on fresh drywall",
            "buy a little more material than you think you need",
            "take a photo of the wiring before you disconnect anything",
            "let the paint dry fully between coats",
        ],
        "fact": [
            "most running toilets are caused by a worn flapper that costs a few dollars",
            "a cheap stud finder is better than knocking on the wall",
            "old houses are rarely square, so measure every wall",
            "the right screw makes a bigger difference than the right drill",
            "good preparation is eighty percent of a good paint job",
        ],
        "problem": [
            "the screw just spins in the hole",
            "the paint starts peeling after a month",
            "the new shelf isn't level",
            "water keeps dripping after you replace the washer",
            "the door sticks every summer",
        ],
        "title": [
            "How to Fix a {thing} in Under an Hour",
            "{num_word} Tools Every Homeowner Should Own",
            "Our Kitchen Makeover on a Budget",
            "A Beginner's Guide to {activity}",
            "The Easy Way to Patch a Hole in Drywall",
        ],
        "sents": [
            "The {thing} had been bothering us for months, so I finally tackled it on a {weekday} afternoon.",
            "You will need a {tool}, some {material} and about an hour of free time.",
            "Sand the area lightly, wipe away the dust, and apply a thin coat of {material}.",
            "I made a trip to the hardware store for {material} and came home with three other things I didn't need.",
            "The whole repair cost less than {money}, compared with a quote of several hundred from a contractor.",
            "Our house was built in 1948, so nothing is quite straight.",
            "If you are not comfortable with electrical work, call a licensed electrician.",
            "Work slowly around the edges, and remove the tape before the paint is completely dry.",
            "After two coats, the wall looks brand new.",
            "The previous owners used regular screws where they should have used wood screws, which explains a lot.",
            "Keep a small repair kit in the garage with a {tool}, a {tool2} and some {material}.",
        ],
    },
    "music": {
        "site": ["www.bedroommusician.com", "chordsandcoffee.net", "www.vinylsundays.org"],
        "path": ["music", "lessons", "reviews"],
        "thing": [
            "chord progression",
            "practice routine",
            "metronome",
            "setlist",
            "home recording",
            "scale",
            "melody",
            "bass line",
        ],
        "instrument": [
            "guitar",
            "piano",
            "ukulele",
            "violin",
            "drums",
            "bass guitar",
            "cello",
            "saxophone",
            "banjo",
            "trumpet",
            "harmonica",
            "mandolin",
        ],
        "genre": [
            "jazz",
            "folk",
            "classic rock",
            "blues",
            "bluegrass",
            "soul",
            "indie pop",
            "classical",
            "country",
            "funk",
            "reggae",
        ],
        "activity": [
            "learning an instrument as an adult",
            "playing in a band",
            "recording music at home",
            "collecting vinyl",
            "practicing every day",
            "writing songs",
        ],
        "tool": ["tuner", "pair of headphones", "audio interface", "microphone", "music stand", "capo", "practice amp"],
        "tip": [
            "practice slowly with a metronome before trying to play fast",
            "record yourself, because you will hear things you miss while playing",
            "fifteen minutes every day beats two hours once a week",
            "learn songs you actually enjoy",
            "stretch your hands before long practice sessions",
        ],
        "fact": [
            "most popular songs use the same four chords",
            "adults can learn an instrument just as well as children, they just have less time",
            "listening closely is half of learning to play",
            "the cheapest instruments are often the hardest to play",
            "playing with other people improves your timing quickly",
        ],
        "problem": [
            "your fingers hurt after a few minutes",
            "you get stuck on the same song for weeks",
            "the recording sounds thin and muddy",
            "nerves take over when you play for others",
            "you lose motivation after the first month",
        ],
        "title": [
            "Learning {instrument} at Forty: One Year In",
            "{num_word} {genre} Albums Everyone Should Hear",
            "How to Build a Practice Routine That Sticks",
            "A Beginner's Guide to {activity}",
            "Why I Fell in Love With {genre} All Over Again",
        ],
        "sents": [
            "I bought my first {instrument} {time_ago}, mostly on a whim.",
            "Our band plays a mix of {genre} and {genre2} covers at a small bar downtown.",
            "The first chord I learned was G major, and it took me a week to play it cleanly.",
            "There is something magical about putting a record on and listening to a whole album from start to finish.",
            "My teacher made me play scales for the first month, and I complained the whole time.",
            "We recorded the demo in my living room with a single microphone and a borrowed laptop.",
            "That album got me through a tough winter, and I still play it every year when the first snow falls.",
            "Playing {instrument} has taught me more patience than anything else in my life.",
            "The open mic night was terrifying, but the crowd was kind.",
            "I switched to lighter strings, and my fingers thanked me.",
            "If you love {genre}, you will probably enjoy the early {genre2} records too.",
        ],
    },
    "hiking": {
        "site": ["www.trailnotesoutdoors.com", "weekendsummits.net", "www.familyhikingguide.org"],
        "path": ["trails", "outdoors", "trip-reports"],
        "thing": ["trail", "campsite", "day pack", "water filter", "trail map", "switchback", "ridge", "trailhead"],
        "trail": [
            "the ridge loop",
            "the waterfall trail",
            "the old logging road",
            "the lake circuit",
            "the summit trail",
            "the coastal path",
            "the canyon overlook",
            "the forest loop",
        ],
        "activity": [
            "hiking with kids",
            "backpacking",
            "camping in the rain",
            "trail running",
            "winter hiking",
            "hiking solo",
        ],
        "tool": [
            "headlamp",
            "pair of trekking poles",
            "first aid kit",
            "compass",
            "lightweight tent",
            "rain shell",
            "sleeping pad",
            "bear canister",
        ],
        "tip": [
            "tell someone where you are going and when you expect to be back",
            "start early to avoid afternoon thunderstorms",
            "carry more water than you think you need",
            "break in new boots before a long hike",
            "leave no trace and pack out everything you bring in",
        ],
        "fact": [
            "the temperature drops quickly once the sun goes behind the ridge",
            "cotton is a poor choice when it is wet and cold",
            "most trail injuries happen on the way down",
            "kids will hike much farther if there is a snack break to look forward to",
            "weather in the mountains changes fast",
        ],
        "problem": [
            "the trail is washed out after a storm",
            "you take a wrong turn at an unmarked junction",
            "your feet start to blister halfway up",
            "it starts raining just as you reach the summit",
            "the campsite is already full",
        ],
        "title": [
            "Hiking {trail}: A Trip Report",
            "{num_word} Essentials for Every Day Hike",
            "A Beginner's Guide to {activity}",
            "Our Favorite Family Hikes Near {city}",
            "What I Pack for a Weekend in the Backcountry",
        ],
        "sents": [
            "We hiked {trail} on a cool {weekday} in early October, and the colors were incredible.",
            "The first mile climbs steadily through pine forest before opening onto a rocky ridge.",
            "From the top, you can see the lake and, on a clear day, the mountains beyond.",
            "We saw two deer, a very bold chipmunk and absolutely no other people.",
            "The round trip is about {num_word} miles with roughly two thousand feet of elevation gain.",
            "Parking at the trailhead fills up by eight on weekends, so arrive early.",
            "My daughter insisted on carrying her own pack, which lasted about twenty minutes.",
            "We set up camp by the creek and fell asleep to the sound of the water.",
            "The descent was steep and slippery, and I was glad to have my {tool}.",
            "It rained for most of the afternoon, but the hot chocolate at the end made up for it.",
            "Check the ranger station website for trail conditions before you go.",
        ],
    },
    "parenting": {
        "site": ["www.messyhomehappykids.com", "thetiredparent.net", "www.raisinglittlereaders.org"],
        "path": ["family", "parenting", "kids"],
        "thing": [
            "bedtime routine",
            "screen time rule",
            "chore chart",
            "school lunch",
            "morning routine",
            "family dinner",
            "weekend plan",
            "reading habit",
        ],
        "kid": ["toddler", "six-year-old", "teenager", "preschooler", "ten-year-old", "twins", "oldest", "youngest"],
        "activity": [
            "raising kids",
            "getting kids to read",
            "working from home with kids",
            "planning family weekends",
            "packing school lunches",
            "limiting screen time",
        ],
        "tool": ["visual timer", "library card", "whiteboard calendar", "lunch box", "board game", "reward chart"],
        "tip": [
            "give kids two choices instead of an open question",
            "read aloud every night, even to older kids",
            "let kids help in the kitchen, even if it makes a mess",
            "keep the morning routine the same every day",
            "put your own phone away at dinner",
        ],
        "fact": [
            "kids copy what we do far more than what we say",
            "boredom is actually good for creativity",
            "most toddlers eat better when they are not pressured",
            "a predictable routine makes bedtime much easier",
            "teenagers really do need more sleep",
        ],
        "problem": [
            "bedtime turns into a two-hour negotiation",
            "the kids fight over the same toy",
            "nobody wants to eat what you cooked",
            "homework ends in tears",
            "the morning rush makes everyone late",
        ],
        "title": [
            "How We Survived the Toddler Years",
            "{num_word} Rainy Day Activities for Kids",
            "A Realistic Guide to {activity}",
            "What Our {kid} Taught Me This Year",
            "Simple Ways to Make Family Dinners Happen",
        ],
        "sents": [
            "Our {kid} announced at breakfast that vegetables are no longer allowed in the house.",
            "We started a family game night {time_ago}, and it has become the highlight of the week.",
            "Some days the best you can do is get everyone fed and in bed, and that is okay.",
            "The library has become our favorite free outing.",
            "Our {kid} now helps set the table without being asked, which feels like a small miracle.",
            "We tried a chore chart, and it worked for almost three weeks.",
            "Bedtime used to take an hour, but a simple routine cut it down to twenty minutes.",
            "My {kid} asked me why the sky is blue, and I realized I did not really know.",
            "There is no perfect way to do this, only what works for your family right now.",
            "Grandparents visiting for the weekend means everyone gets a little extra sleep.",
            "We keep a basket of books by the door so there is always something to read in the car.",
        ],
    },
}

# Sentences that contain prose comparisons with "<" and ">" (not markup), by topic.
COMPARISONS = [
    "If the dough is < 1 cm thick, cut the baking time by a few minutes.",
    "Any bill where interest > 20% should be paid off first, and anything < 5% can wait.",
    "In code, a loop like for (i = 0; i<n; i++) is the usual way to do this, as long as n>0.",
    "My rule is simple: if x<y and y<z, then x<z, and the same goes for your budget categories.",
    "Keep puppies on short walks (< 20 minutes) until they are about six months old.",
    "On hot days (> 90°F) we only hike before 10 a.m.",
    "Water the seedlings when the top inch of soil is dry, usually < 2 days apart in July.",
    "My average pace dropped from 10:30 to < 9:00 per mile over the summer.",
    "If your emergency fund is < 3 months of expenses, build that before investing.",
    "The rule of thumb for screen time is < 1 hour a day for preschoolers.",
]


_SMALL_WORDS = {"a", "an", "the", "to", "of", "in", "for", "and", "on", "at", "with", "from", "by", "or", "it", "is"}


def title_case(title: str) -> str:
    out = [w if (i and w in _SMALL_WORDS) else w[:1].upper() + w[1:] for i, w in enumerate(title.split(" "))]
    return " ".join(out)


def general_doc(rng: random.Random, topic: str) -> str:
    spec = TOPICS[topic]
    vocab = {**SHARED_VOCAB, **{k: v for k, v in spec.items() if k not in ("sents", "title", "site", "path")}}
    while True:
        # Topic sentences outnumber the generic blog sentences so each topic keeps its own vocabulary.
        pool = spec["sents"] + rng.sample(SHARED_TEMPLATES, 14)
        target = int(rng.triangular(100, 480, 200))
        order = rng.sample(pool, len(pool))
        paragraphs, count = [], 0
        if rng.random() < 0.6:
            title = fill(rng, rng.choice(spec["title"]), vocab)
            paragraphs.append(title_case(title))
            count += words(title)
        while count < target and order:
            paragraph = []
            for _ in range(rng.randint(2, 5)):
                if not order or count >= target:
                    break
                sentence = tidy(fill(rng, order.pop(), vocab))
                paragraph.append(sentence)
                count += words(sentence)
            if paragraph:
                paragraphs.append(" ".join(paragraph))
        text = "\n\n".join(paragraphs)
        if 100 <= words(text) <= 500:
            return text


# ---------------------------------------------------------------------------
# Other languages: realistic sentences, long enough for language identification
# ---------------------------------------------------------------------------

FOREIGN = {
    "de": {
        "general": [
            "Letzte Woche waren wir mit den Kindern in {place} und haben einen langen Spaziergang am See gemacht.",
            "Das Rezept ist ganz einfach: Man braucht nur Mehl, Butter, Zucker und ein paar Eier.",
            "Im Frühling pflanze ich Tomaten, Basilikum und Zucchini auf unserem kleinen Balkon.",
            "Die Zugfahrt nach {place} dauerte fast vier Stunden, aber die Landschaft war wunderschön.",
            "Mein Hund {name} wartet jeden Morgen an der Tür, bis wir endlich spazieren gehen.",
            "Wer regelmäßig Sport treibt, schläft besser und fühlt sich im Alltag ausgeglichener.",
            "Wir haben das alte Badezimmer selbst renoviert, und es hat viel länger gedauert als geplant.",
            "Ich empfehle jedem, ein kleines Haushaltsbuch zu führen, um die Ausgaben im Blick zu behalten.",
            "Am Wochenende findet in der Altstadt ein Markt mit regionalen Produkten statt.",
            "Die Geschichte der Stadt reicht bis ins Mittelalter zurück, als hier Händler aus ganz Europa zusammenkamen.",
            "Nach dem Essen haben wir noch lange zusammengesessen und über alte Zeiten gesprochen.",
            "Das neue Handy ist schneller, aber der Akku hält leider nicht länger als einen Tag.",
            "Bei schlechtem Wetter spielen wir gerne Brettspiele oder lesen gemeinsam ein Buch.",
            "Ich habe vor {num} Jahren angefangen, Gitarre zu spielen, und übe fast jeden Abend.",
        ],
        "domain": [
            "Hintergrund: Die Pharmakokinetik von {drug} bei älteren Patienten ist bisher nur unzureichend untersucht.",
            "Methoden: In einer prospektiven Studie erhielten {n} Patienten {drug} in einer Dosis von {dose} zweimal täglich.",
            "Blutproben wurden bis zu 24 Stunden nach der Einnahme entnommen und mittels LC-MS/MS analysiert.",
            "Ergebnisse: Die mittlere Halbwertszeit betrug {num} Stunden, und die Clearance war bei Niereninsuffizienz deutlich reduziert.",
            "Die gleichzeitige Gabe eines starken CYP3A4-Hemmers erhöhte die Exposition etwa um das Dreifache.",
            "Unerwünschte Wirkungen wie Übelkeit und Kopfschmerzen traten bei etwa {num} Prozent der Teilnehmer auf.",
            "Schlussfolgerungen: Bei eingeschränkter Nierenfunktion sollte die Dosis angepasst und die Konzentration regelmäßig überwacht werden.",
            "Weitere Studien mit größeren Patientenzahlen sind notwendig, um diese Ergebnisse zu bestätigen.",
        ],
    },
    "fr": {
        "general": [
            "Le week-end dernier, nous sommes allés à {place} pour découvrir le marché et les petites rues du centre.",
            "Pour réussir cette recette, il faut laisser reposer la pâte au moins une heure au réfrigérateur.",
            "Au printemps, je sème des radis, de la laitue et des herbes aromatiques dans le jardin.",
            "Le voyage en train était long, mais les paysages de la campagne étaient magnifiques.",
            "Notre chat {name} passe ses journées à dormir au soleil sur le rebord de la fenêtre.",
            "Faire du sport trois fois par semaine m'a aidé à mieux dormir et à réduire le stress.",
            "Nous avons repeint toute la cuisine nous-mêmes, et le résultat est bien meilleur que prévu.",
            "Il est important de garder une petite épargne de côté pour les dépenses imprévues.",
            "La ville a une histoire riche qui remonte à l'époque romaine, et on le voit dans chaque quartier.",
            "Après le dîner, nous avons joué aux cartes avec les enfants jusqu'à tard dans la soirée.",
            "Mon nouvel ordinateur portable est plus rapide, mais la batterie ne tient pas toute la journée.",
            "J'ai commencé à apprendre le piano il y a {num} ans et je joue presque tous les soirs.",
            "Quand il pleut, nous restons à la maison pour lire ou regarder un vieux film.",
        ],
        "domain": [
            "Contexte : la pharmacocinétique de {drug} chez les patients âgés reste mal connue.",
            "Méthodes : dans cette étude prospective, {n} patients ont reçu {drug} à la dose de {dose} deux fois par jour.",
            "Des prélèvements sanguins ont été réalisés jusqu'à 24 heures après la prise et analysés par LC-MS/MS.",
            "Résultats : la demi-vie moyenne était de {num} heures et la clairance était nettement diminuée en cas d'insuffisance rénale.",
            "L'association avec un inhibiteur puissant du CYP3A4 a multiplié l'exposition par trois environ.",
            "Des effets indésirables comme les nausées et les céphalées ont été observés chez environ {num} pour cent des participants.",
            "Conclusions : chez les patients insuffisants rénaux, la dose doit être adaptée et les concentrations surveillées régulièrement.",
            "D'autres études sur des effectifs plus importants sont nécessaires pour confirmer ces résultats.",
        ],
    },
    "es": {
        "general": [
            "El fin de semana pasado fuimos a {place} para visitar el mercado y pasear por el casco antiguo.",
            "Para esta receta solo necesitas harina, aceite de oliva, un poco de sal y agua tibia.",
            "En primavera siembro tomates, pimientos y albahaca en las macetas del balcón.",
            "El viaje en autobús fue largo, pero las vistas de las montañas merecieron la pena.",
            "Nuestro perro {name} nos espera todas las tardes en la puerta para salir a caminar.",
            "Hacer ejercicio tres veces por semana me ayudó a dormir mejor y a tener más energía.",
            "Pintamos la casa nosotros mismos y tardamos mucho más de lo que habíamos pensado.",
            "Es muy importante ahorrar un poco cada mes para los gastos inesperados.",
            "La historia de la ciudad se remonta a la época romana, y todavía se conservan partes de la muralla.",
            "Después de la cena nos quedamos hablando en la terraza hasta muy tarde.",
            "El teléfono nuevo es más rápido, pero la batería no dura ni un día entero.",
            "Empecé a tocar la guitarra hace {num} años y ahora practico casi todas las noches.",
            "Cuando llueve, nos quedamos en casa jugando a juegos de mesa con los niños.",
        ],
        "domain": [
            "Antecedentes: la farmacocinética de {drug} en pacientes de edad avanzada ha sido poco estudiada.",
            "Métodos: en este estudio prospectivo, {n} pacientes recibieron {drug} a una dosis de {dose} dos veces al día.",
            "Se obtuvieron muestras de sangre hasta 24 horas después de la administración y se analizaron mediante LC-MS/MS.",
            "Resultados: la semivida media fue de {num} horas y el aclaramiento se redujo de forma importante en la insuficiencia renal.",
            "La administración conjunta con un inhibidor potente del CYP3A4 triplicó aproximadamente la exposición.",
            "Se observaron efectos adversos como náuseas y cefalea en aproximadamente el {num} por ciento de los participantes.",
            "Conclusiones: en pacientes con insuficiencia renal se debe ajustar la dosis y vigilar las concentraciones de forma periódica.",
            "Se necesitan estudios más amplios para confirmar estos resultados.",
        ],
    },
    "zh": {
        "general": [
            "上个周末我们全家去了公园散步，天气很好，孩子们玩得非常开心。",
            "这道菜做法很简单，只需要鸡蛋、西红柿、一点盐和糖就可以了。",
            "春天的时候，我在阳台上种了一些番茄和薄荷，现在已经长得很高了。",
            "坐火车旅行虽然时间比较长，但是可以看到沿途美丽的风景。",
            "每天坚持运动半个小时，对身体健康和睡眠都有很大的帮助。",
            "我们每个月都会把一部分工资存起来，以备不时之需。",
            "这座城市有着悠久的历史，老城区里还保留着很多传统建筑。",
        ],
        "domain": [
            "背景：目前关于{drug}在老年患者中的药代动力学研究仍然有限。",
            "方法：本研究共纳入{n}例患者，给予{drug}每日两次，每次{dose}。",
            "结果：平均半衰期为{num}小时，肾功能不全患者的清除率明显降低。",
            "与强效CYP3A4抑制剂合用时，药物暴露量增加约三倍。",
            "常见不良反应包括恶心和头痛，发生率约为百分之{num}。",
            "结论：对于肾功能不全的患者，应调整剂量并定期监测血药浓度。",
        ],
    },
}
FOREIGN_VOCAB = {
    "place": [
        "Berlin",
        "Lyon",
        "Sevilla",
        "München",
        "Bordeaux",
        "Valencia",
        "Hamburg",
        "Marseille",
        "Granada",
        "Köln",
        "Toulouse",
        "Bilbao",
    ],
    "name": ["Bruno", "Luna", "Félix", "Paco", "Emma", "Rocco"],
    "num": _int(3, 24),
    "n": _int(20, 480),
    "dose": DOSES,
    "drug": [d for d, _ in DRUGS],
}


def foreign_doc(rng: random.Random, lang: str, kind: str) -> str:
    sentences = FOREIGN[lang][kind]
    joiner = "" if lang == "zh" else " "
    if kind == "domain":
        keep = sorted(rng.sample(range(1, len(sentences)), rng.randint(4, len(sentences) - 1)))
        chosen = [sentences[0]] + [sentences[i] for i in keep]  # keep the Background -> Conclusions order
    else:
        chosen = rng.sample(sentences, rng.randint(min(7, len(sentences)), len(sentences)))
    ctx = {"drug": rng.choice(FOREIGN_VOCAB["drug"])}
    filled = [fill(rng, s, FOREIGN_VOCAB, ctx) for s in chosen]
    half = len(filled) // 2
    return joiner.join(filled[:half]) + "\n\n" + joiner.join(filled[half:])


# ---------------------------------------------------------------------------
# Dirt: what a crawl or a literature dump really contains
# ---------------------------------------------------------------------------

BOILERPLATE = [
    "We use cookies to improve your experience. Accept all cookies",
    "Please enable JavaScript to view this page.",
    "Privacy Policy | Terms of Use",
    "© 2024 Example Corp. All rights reserved.",
    "Subscribe to our newsletter",
    "Share this article: Facebook | Twitter | Email",
    "Skip to main content",
    "Click here to download the full PDF",
]


def add_boilerplate(rng: random.Random, text: str) -> str:
    paragraphs = text.split("\n\n")
    for line in rng.sample(BOILERPLATE, rng.randint(1, 3)):
        paragraphs.insert(rng.choice([0, len(paragraphs), rng.randint(0, len(paragraphs))]), line)
    return "\n\n".join(paragraphs)


def luhn_check_digit(payload: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # doubled positions, counted from the digit left of the check digit
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    digits = [c for c in number if c.isdigit()]
    return luhn_check_digit("".join(digits[:-1])) == digits[-1]


def card_number(rng: random.Random, valid: bool) -> str:
    payload = rng.choice(["4", "51", "53", "55", "4539", "6011"])
    payload += "".join(str(rng.randint(0, 9)) for _ in range(15 - len(payload)))
    check = luhn_check_digit(payload)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    digits = payload + check
    sep = rng.choice([" ", "-", ""])
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def phone_number(rng: random.Random) -> str:
    area, mid, last = (
        rng.choice([212, 312, 415, 617, 206, 303, 512, 404, 720, 919]),
        rng.randint(200, 999),
        rng.randint(0, 9999),
    )
    fmt = rng.choice(
        [
            "({a}) {m}-{l:04d}",
            "{a}-{m}-{l:04d}",
            "{a}.{m}.{l:04d}",
            "+1 {a} {m} {l:04d}",
            "+1-{a}-{m}-{l:04d}",
            "1 ({a}) {m}-{l:04d}",
        ]
    )
    return fmt.format(a=area, m=mid, l=last)


def email_address(rng: random.Random) -> str:
    first, last = rng.choice(FIRST_NAMES).lower(), rng.choice(LAST_NAMES).lower().replace("'", "").replace("ü", "ue")
    user = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{rng.randint(7, 99)}", f"{last}.{first[0]}"])
    return f"{user}@{rng.choice(['gmail.com', 'yahoo.com', 'outlook.com', 'uni-hospital.org', 'pharm.example.edu', 'mailbox.org'])}"


def ssn_like(rng: random.Random) -> str:
    return f"{rng.randint(100, 899):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"


def ipv4(rng: random.Random) -> str:
    return rng.choice(
        [
            f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            f"{rng.randint(23, 216)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        ]
    )


PII_GENERAL = [
    "If you have questions, email me at {email} or call {phone}.",
    "Reach {name} directly at {email}; the shop number is {phone}.",
    "For bookings text {phone} or write to {email}.",
    "Order confirmation: paid with card {card_valid}, exp 04/27.",
    "Someone in the comments posted their card number, {card_valid}, so please don't do that.",
    "Test card for the checkout page: {card_invalid}.",
    "Applicant SSN {ssn}, daytime phone {phone}.",
    "The router admin page is at {ip}, and my laptop got {ip2} from DHCP.",
    "Server logs showed hundreds of requests from {ip}.",
]
PII_DOMAIN = [
    "Correspondence: Dr {name} {surname}, Department of Clinical Pharmacology, {email}, tel. {phone}.",
    "Corresponding author: {email}; phone {phone}; fax {phone2}.",
    "Participant 017 (SSN {ssn}) was withdrawn after the second visit.",
    "The electronic case report forms were hosted on a server at {ip}.",
    "The registration fee was charged to card {card_valid}.",
    "Sponsor billing reference {card_invalid}.",
]
PII_VOCAB = {
    "email": email_address,
    "phone": phone_number,
    "ssn": ssn_like,
    "ip": ipv4,
    "name": FIRST_NAMES,
    "surname": LAST_NAMES,
    "card_valid": lambda rng: card_number(rng, True),
    "card_invalid": lambda rng: card_number(rng, False),
}


def add_pii(rng: random.Random, text: str, templates: list[str], first: bool) -> str:
    paragraphs = text.split("\n\n")
    chosen = rng.sample(templates, rng.randint(1, 2))
    filled = [fill(rng, t, PII_VOCAB) for t in chosen]
    if first:  # one canonical test number per corpus, the one every PII test suite knows
        filled[0] = "Payment test: 4111 1111 1111 1111 was accepted by the sandbox. " + filled[0]
    at = rng.randint(1, len(paragraphs))
    paragraphs[at - 1] = paragraphs[at - 1] + " " + " ".join(filled)
    return "\n\n".join(paragraphs)


SYNONYMS = {
    "very": "really",
    "small": "little",
    "large": "big",
    "simple": "easy",
    "often": "frequently",
    "first": "initial",
    "great": "good",
    "best": "finest",
    "increased": "raised",
    "reduced": "decreased",
    "patients": "subjects",
    "participants": "volunteers",
    "significantly": "markedly",
    "always": "usually",
    "quickly": "fast",
    "mean": "average",
    "study": "trial",
    "favorite": "favourite",
    "home": "house",
    "year": "season",
    "time": "moment",
    "started": "began",
    "recommended": "advised",
    "higher": "greater",
    "lower": "smaller",
    "new": "fresh",
    "old": "aging",
}
NEAR_DUP_TAILS = {
    "domain": [
        "Trial registration: NCT0{reg}.",
        "Funding: none declared.",
        "The authors declare no competing interests.",
        "This article is protected by copyright.",
    ],
    "general": [
        "Thanks for reading!",
        "Updated: fixed a couple of typos.",
        "This post may contain affiliate links.",
        "Got a question? Drop it in the comments.",
    ],
}


def near_duplicate(rng: random.Random, text: str, corpus: str) -> str:
    tokens = text.split(" ")
    swappable = [i for i, t in enumerate(tokens) if t.lower() in SYNONYMS]
    if swappable and rng.random() < 0.65:
        for i in rng.sample(swappable, min(len(swappable), rng.randint(1, 3))):
            tokens[i] = SYNONYMS[tokens[i].lower()]
        return " ".join(tokens)
    tail = rng.choice(NEAR_DUP_TAILS[corpus]).replace("{reg}", str(rng.randint(1000000, 5999999)))
    return text + " " + tail


NAV = [
    "Home",
    "About",
    "Blog",
    "Recipes",
    "Travel",
    "Contact",
    "Archive",
    "Shop",
    "Journals",
    "Authors",
    "Subscribe",
    "Search",
]


def html_escape_prose(text: str, rng: random.Random) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("'", "&#8217;" if rng.random() < 0.7 else "&rsquo;")
    return text.replace(" - ", " &ndash; ")


def html_page(rng: random.Random, text: str, site_title: str) -> str:
    paragraphs = text.split("\n\n")
    title = paragraphs[0] if len(paragraphs[0]) <= 80 else paragraphs[0][:70].rsplit(" ", 1)[0] + "…"
    body = [f"<p>{html_escape_prose(p, rng)}</p>" for p in paragraphs]
    if len(body) > 1:
        body[1] = body[1].replace(". ", ".&nbsp; ", 1)
    nav = "\n".join(
        f'      <li><a href="/{item.lower()}">{item}</a></li>' for item in rng.sample(NAV, rng.randint(3, 6))
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html_escape_prose(title, rng)} | {site_title}</title>
  <style>body {{ font-family: Georgia, serif; margin: 0 auto; max-width: 720px; }} .cookie-banner {{ position: fixed; bottom: 0; }} nav li {{ display: inline; }}</style>
  <script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}} gtag('js', new Date()); if (a < b && b > c) {{ track(); }}</script>
</head>
<body>
  <nav class="main-menu">
    <ul>
{nav}
    </ul>
  </nav>
  <div class="cookie-banner" id="consent">We use cookies to improve your experience. <button>Accept all cookies</button> <a href="/privacy">Privacy Policy</a></div>
  <article>
    <h1>{html_escape_prose(title, rng)}</h1>
    {chr(10).join("    " + b if i else b for i, b in enumerate(body))}
  </article>
  <footer><p>&copy; 2024 {site_title} &amp; partners. All rights reserved. | <a href="/terms">Terms of Use</a></p></footer>
</body>
</html>"""


def _cp1252_misread(data: bytes) -> str:
    # Bytes that cp1252 leaves undefined (0x81, 0x8d, ...) fall back to Latin-1, as in ftfy's "sloppy" codec.
    out = []
    for b in data:
        try:
            out.append(bytes([b]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(chr(b))
    return "".join(out)


MOJIBAKE_SEEDS = [
    "We finished the day at a little café with crème brûlée and a café au lait.",
    "It’s a naïve question, but don’t skip it — it matters.",
    "The jalapeño salsa was the highlight of the entire fiesta.",
]


def mojibake(rng: random.Random, text: str) -> str:
    """UTF-8 text decoded as Windows-1252: "café" becomes "cafÃ©", "don’t" becomes "donâ€™t" (ftfy repairs it)."""
    text = text.replace("'", "’").replace(" - ", " — ")
    if text.isascii() or rng.random() < 0.5:
        paragraphs = text.split("\n\n")
        paragraphs[-1] += " " + rng.choice(MOJIBAKE_SEEDS)
        text = "\n\n".join(paragraphs)
    return _cp1252_misread(text.encode("utf-8"))


SPAM = {
    "general": [
        "Buy cheap pills now!",
        "Make money fast from home!!!",
        "Click here for FREE iPhone!",
        "Best replica watches cheap cheap cheap",
        "Hot singles in your area click now",
    ],
    "domain": [
        "Buy cheap pills now!",
        "Order cheap viagra online no prescription needed!",
        "Best price cialis tramadol overnight delivery!",
        "Cheap meds online pharmacy 80% off!",
    ],
}


def spam(rng: random.Random, corpus: str) -> str:
    phrase = rng.choice(SPAM[corpus])
    return " ".join([phrase] * rng.randint(15, 40))


LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. "
    "Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. "
    "Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. "
    "Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit anim id est laborum."
)

SHORT = {
    "general": [
        "Thanks for reading! Leave a comment below.",
        "Page not found. Return to the homepage.",
        "Sold out. Check back soon!",
        "This post has been moved to our new site.",
        "Coming soon: part two of this series.",
        "{tip}.",
    ],
    "domain": [
        "Erratum: in the article on {drug}, the dose in Table 2 should read {dose}, not 10 times that amount.",
        "This article has been retracted at the request of the authors.",
        "Results: see Table 2.",
        "Abstract not available.",
        "Correction to: pharmacokinetics of {drug} in {condition}.",
    ],
}


def too_short(rng: random.Random, corpus: str) -> str:
    while True:
        if corpus == "general":
            topic = rng.choice(sorted(TOPICS))
            text = tidy(fill(rng, rng.choice(SHORT["general"]), {**SHARED_VOCAB, **TOPICS[topic]}))
        else:
            text = tidy(fill(rng, rng.choice(SHORT["domain"]), DOMAIN_VOCAB, {"drug": rng.choice(DRUGS)[0]}))
        if words(text) < 30:
            return text


def add_comparison(rng: random.Random, text: str) -> str:
    paragraphs = text.split("\n\n")
    at = rng.randint(0, len(paragraphs) - 1)
    paragraphs[at] += " " + rng.choice(COMPARISONS)
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------------------
# Corpus assembly: a shuffled plan of kinds, so dirt is spread through the files
# ---------------------------------------------------------------------------

DOMAIN_DIRT = {
    "exact_duplicate": 50,
    "near_duplicate": 30,
    "html": 40,
    "boilerplate": 25,
    "pii": 20,
    "foreign_de": 12,
    "foreign_fr": 12,
    "foreign_es": 12,
    "foreign_zh": 4,
    "too_short": 15,
    "spam": 8,
    "lorem_ipsum": 2,
    "mojibake": 12,
}
GENERAL_DIRT = {
    "exact_duplicate": 90,
    "near_duplicate": 54,
    "html": 80,
    "boilerplate": 45,
    "pii": 36,
    "foreign_de": 22,
    "foreign_fr": 22,
    "foreign_es": 22,
    "foreign_zh": 6,
    "too_short": 27,
    "spam": 14,
    "lorem_ipsum": 2,
    "mojibake": 22,
    "comparison": 36,
}


def build_corpus(
    rng: random.Random, n: int, corpus: str, dirt: dict[str, int], make_clean
) -> list[tuple[str, str, dict]]:
    """Return [(kind, text, meta)] in file order; `make_clean(rng)` -> (text, meta)."""
    plan = ["clean"] * (n - sum(dirt.values()))
    for kind, count in dirt.items():
        plan += [kind] * count
    rng.shuffle(plan)
    docs: list = [None] * n
    pii_seen = False
    for i, kind in enumerate(plan):
        if kind in ("exact_duplicate", "near_duplicate"):
            continue
        text, meta = make_clean(rng)
        if kind == "html":
            text = html_page(rng, text, meta.get("site_title", "Example Corp"))
        elif kind == "boilerplate":
            text = add_boilerplate(rng, text)
        elif kind == "pii":
            text = add_pii(rng, text, PII_DOMAIN if corpus == "domain" else PII_GENERAL, first=not pii_seen)
            pii_seen = True
        elif kind.startswith("foreign_"):
            text = foreign_doc(rng, kind.split("_")[1], corpus)
        elif kind == "too_short":
            text = too_short(rng, corpus)
        elif kind == "spam":
            text = spam(rng, corpus)
        elif kind == "lorem_ipsum":
            text = LOREM if rng.random() < 0.5 else LOREM + "\n\n" + LOREM
        elif kind == "mojibake":
            text = mojibake(rng, text)
        elif kind == "comparison":
            text = add_comparison(rng, text)
        docs[i] = (kind, text, meta)
    clean_positions = [i for i, kind in enumerate(plan) if kind == "clean"]
    for i, kind in enumerate(plan):
        if docs[i] is not None:
            continue
        earlier = [j for j in clean_positions if j < i] or clean_positions
        source = rng.choice(earlier)
        _, text, meta = docs[source]
        if kind == "near_duplicate":
            text = near_duplicate(rng, text, corpus)
        docs[i] = (kind, text, {**meta, "duplicate_of": source})
    return docs


def abstract_record(rng: random.Random) -> tuple[str, dict]:
    return make_abstract(rng), {
        "journal": rng.choice(JOURNALS),
        "year": rng.randint(1998, 2024),
        "site_title": "PharmaAbstracts Online",
    }


def web_record(rng: random.Random) -> tuple[str, dict]:
    topic = rng.choice(sorted(TOPICS))
    spec = TOPICS[topic]
    text = general_doc(rng, topic)
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(text.split()[:6]).lower()).strip("-")
    site = rng.choice(spec["site"])
    url = f"https://{site}/{rng.choice(spec['path'])}/{slug}"
    return text, {"url": url, "topic": topic, "site_title": site.removeprefix("www.")}


MIRROR_SITES = ["www.contentfarm-daily.com", "blogaggregator.net", "www.scrapedposts.info", "mirror.readlater.io"]


def score_general(rng: random.Random, docs: list) -> list[int]:
    """FineWeb-Edu-like int_score: junk always scores <= 1, then random docs until ~10% do."""
    scores = [rng.choices([2, 3, 4, 5], weights=[30, 35, 25, 10])[0] for _ in docs]
    low = [i for i, (kind, _, _) in enumerate(docs) if kind in ("spam", "too_short", "lorem_ipsum")]
    others = [i for i in range(len(docs)) if i not in set(low)]
    low += rng.sample(others, len(docs) // 10 - len(low))
    for i in low:
        scores[i] = rng.choice([0, 1, 1])
    return scores


# ---------------------------------------------------------------------------
# Instruction data for the SFT stage (answers computed, not sampled, where numeric)
# ---------------------------------------------------------------------------

GLOSSARY = {
    "AUC": "The area under the plasma concentration-time curve (AUC) measures total drug exposure over a period. It is proportional to the dose that reaches the circulation divided by clearance, so it rises when clearance falls, for example when a metabolizing enzyme is inhibited.",
    "Cmax": "Cmax is the highest plasma concentration observed after a dose. It depends on the dose, the rate and extent of absorption and the volume of distribution, and it is often linked to concentration-dependent adverse effects.",
    "Tmax": "Tmax is the time after dosing at which the peak plasma concentration (Cmax) is reached. It mainly reflects the rate of absorption; food or delayed-release formulations usually prolong it.",
    "half-life": "The elimination half-life (t1/2) is the time needed for the plasma concentration to fall by half. It equals 0.693 × Vd / CL, so it depends on both distribution and clearance, and it determines how long it takes to reach steady state (about four to five half-lives).",
    "clearance": "Clearance (CL) is the volume of plasma completely cleared of drug per unit time, usually expressed in L/h. It determines the maintenance dose needed to achieve a target average steady-state concentration: dose rate = CL × Css.",
    "volume of distribution": "The volume of distribution (Vd) relates the amount of drug in the body to the plasma concentration. A large Vd means the drug distributes extensively into tissues; Vd determines the loading dose needed to reach a target concentration quickly.",
    "bioavailability": "Bioavailability (F) is the fraction of an administered dose that reaches the systemic circulation unchanged. Intravenous doses have F = 1; oral bioavailability is reduced by incomplete absorption and first-pass metabolism.",
    "steady state": "Steady state is reached when the amount of drug eliminated per dosing interval equals the amount given. With repeated dosing it takes about four to five half-lives, regardless of the dose.",
    "loading dose": "A loading dose is a larger initial dose used to reach the target concentration quickly, instead of waiting four to five half-lives. It is calculated as Vd × target concentration, divided by bioavailability for oral doses.",
    "therapeutic drug monitoring": "Therapeutic drug monitoring (TDM) is the measurement of drug concentrations, usually trough levels at steady state, to individualize the dose. It is useful for drugs with a narrow therapeutic index and large variability, such as vancomycin, tacrolimus or lithium.",
    "narrow therapeutic index": "A drug has a narrow therapeutic index when the concentrations that cause toxicity are close to those needed for efficacy. Small changes in exposure, for example from drug interactions or organ impairment, can then cause harm; examples include warfarin, digoxin, lithium and phenytoin.",
    "first-pass metabolism": "First-pass metabolism is the metabolism of an orally absorbed drug in the gut wall and liver before it reaches the systemic circulation. Drugs with high first-pass extraction have low oral bioavailability and are sensitive to CYP3A4 inhibition.",
    "enzyme induction": "Enzyme induction is an increase in the amount of a metabolizing enzyme, such as CYP3A4, caused by drugs like rifampicin or carbamazepine. It lowers exposure to substrate drugs, develops over one to two weeks and reverses slowly after the inducer is stopped.",
    "enzyme inhibition": "Enzyme inhibition is a reduction in the activity of a metabolizing enzyme by another drug. Strong CYP3A4 inhibitors such as ketoconazole or clarithromycin can increase the AUC of sensitive substrates like midazolam more than fivefold.",
    "prodrug": "A prodrug is an inactive compound that is converted to its active form in the body. Clopidogrel, for example, needs activation by CYP2C19, so poor metabolizers have reduced antiplatelet effect.",
    "poor metabolizer": "A poor metabolizer carries two non-functional alleles of a drug-metabolizing enzyme gene, such as CYP2D6 or CYP2C19. Poor metabolizers have higher exposure to drugs cleared by that enzyme and lower exposure to active metabolites of prodrugs.",
    "protein binding": "Protein binding is the fraction of drug bound to plasma proteins such as albumin. Only the unbound drug is pharmacologically active and can be cleared, so changes in albumin matter for highly bound drugs like phenytoin.",
    "trough concentration": "The trough concentration (Ctrough or Cmin) is the lowest concentration in a dosing interval, measured just before the next dose. It is the usual sample for therapeutic drug monitoring at steady state.",
    "bioequivalence": "Two formulations are bioequivalent when the 90% confidence intervals of the geometric mean ratios for AUC and Cmax lie within 80–125%. Bioequivalent generic products can be substituted for the reference product.",
    "hazard ratio": "A hazard ratio (HR) compares the rate of an event between two groups over time. An HR of 0.76 means the event rate in the treated group was 24% lower than in the control group at any given time.",
    "95% confidence interval": "A 95% confidence interval gives a range of values compatible with the data; if the study were repeated many times, 95% of such intervals would contain the true value. For a ratio, an interval that excludes 1 corresponds to p < 0.05.",
    "population pharmacokinetics": "Population pharmacokinetics uses nonlinear mixed-effects models to describe typical drug disposition and its variability between individuals. It can use sparse samples from routine care and identifies covariates, such as weight or renal function, that explain variability.",
}
DEFINE_PROMPTS = [
    "Explain what {term} means in clinical pharmacology.",
    "Define {term}.",
    "What is {term}, and why does it matter for dosing?",
    "Give a short explanation of {term} for a pharmacy student.",
]

# Victim drugs with a well-established main elimination or activation pathway.
INTERACTION_PAIRS = [
    ("midazolam", "CYP3A4", "ketoconazole", "inhibitor"),
    ("simvastatin", "CYP3A4", "clarithromycin", "inhibitor"),
    ("tacrolimus", "CYP3A4", "voriconazole", "inhibitor"),
    ("cyclosporine", "CYP3A4", "ritonavir", "inhibitor"),
    ("ibrutinib", "CYP3A4", "itraconazole", "inhibitor"),
    ("quetiapine", "CYP3A4", "ketoconazole", "inhibitor"),
    ("ticagrelor", "CYP3A4", "rifampicin", "inducer"),
    ("apixaban", "CYP3A4 and P-glycoprotein", "rifampicin", "inducer"),
    ("tacrolimus", "CYP3A4", "carbamazepine", "inducer"),
    ("midazolam", "CYP3A4", "St John's wort", "inducer"),
    ("warfarin", "CYP2C9", "fluconazole", "inhibitor"),
    ("phenytoin", "CYP2C9", "fluconazole", "inhibitor"),
    ("metoprolol", "CYP2D6", "paroxetine", "inhibitor"),
    ("aripiprazole", "CYP2D6 and CYP3A4", "fluoxetine", "inhibitor"),
    ("olanzapine", "CYP1A2", "fluvoxamine", "inhibitor"),
    ("clopidogrel", "CYP2C19", "omeprazole", "inhibitor"),
    ("escitalopram", "CYP2C19", "fluvoxamine", "inhibitor"),
    ("dabigatran etexilate", "P-glycoprotein", "rifampicin", "inducer"),
    ("digoxin", "P-glycoprotein", "amiodarone", "inhibitor"),
    ("rosuvastatin", "OATP1B1 and BCRP", "cyclosporine", "inhibitor"),
]
# (question, how the answer opens): "Is it safe?" must not be answered "Yes".
INTERACTION_PROMPTS = [
    ("Could {perp} change exposure to {victim}?", "Yes. "),
    ("A patient on {victim} is starting {perp}. What interaction should I expect?", ""),
    ("Explain the pharmacokinetic interaction between {victim} and {perp}.", ""),
    ("Is it safe to add {perp} to {victim}?", "Not without precautions. "),
]


def interaction_qa(rng: random.Random, pair: tuple[str, str, str, str]) -> tuple[str, str]:
    victim, pathway, perp, role = pair
    prompt, opening = rng.choice(INTERACTION_PROMPTS)
    return prompt.format(victim=victim, perp=perp), opening + interaction_answer(victim, pathway, perp, role)


def interaction_answer(victim: str, pathway: str, perp: str, role: str) -> str:
    if victim == "clopidogrel":
        return (
            "Clopidogrel is a prodrug activated by CYP2C19, and omeprazole inhibits CYP2C19, so less active metabolite is formed "
            "and the antiplatelet effect may be reduced. Consider pantoprazole, which has less effect on CYP2C19, if a proton pump inhibitor is needed."
        )
    if role == "inhibitor":
        return (
            f"{victim.capitalize()} is cleared mainly via {pathway}, and {perp} inhibits this pathway. Expect higher {victim} concentrations "
            f"and a greater risk of dose-related adverse effects. Avoid the combination if possible; otherwise reduce the {victim} dose, "
            "monitor clinically and, where available, measure concentrations."
        )
    return (
        f"{perp.capitalize()} induces {pathway}, which clears {victim}, so {victim} exposure will fall and efficacy may be lost. "
        f"The effect builds over one to two weeks and persists for about two weeks after {perp} is stopped. Avoid the combination or "
        f"choose an alternative; if unavoidable, monitor the response and adjust the {victim} dose."
    )


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def calc_task(rng: random.Random, kind: str) -> tuple[str, str, str]:
    drug = rng.choice(DRUGS)[0]
    if kind == "maintenance":
        cl, css = rng.choice([1.5, 2.4, 3.2, 4.0, 4.5, 5.6, 6.0, 7.5, 8.0, 12.0]), rng.choice([2, 5, 8, 10, 15, 20])
        rate = cl * css
        return (
            "Calculate the maintenance dose rate needed to reach the target average steady-state concentration.",
            f"Drug: {drug}. Clearance: {_fmt(cl)} L/h. Target average steady-state concentration: {css} mg/L. Assume intravenous dosing.",
            f"Maintenance dose rate = CL × Css = {_fmt(cl)} L/h × {css} mg/L = {_fmt(rate)} mg/h, which is {_fmt(rate * 24)} mg per day.",
        )
    if kind == "half_life":
        vd, cl = rng.choice([20, 35, 50, 70, 140, 250, 400]), rng.choice([2.0, 3.5, 5.0, 7.0, 10.0, 14.0])
        t = 0.693 * vd / cl
        return (
            "Estimate the elimination half-life from the volume of distribution and clearance.",
            f"Vd = {vd} L; CL = {_fmt(cl)} L/h.",
            f"t1/2 = 0.693 × Vd / CL = 0.693 × {vd} L / {_fmt(cl)} L/h = {t:.1f} h. Steady state will be reached after about {4 * t:.0f}–{5 * t:.0f} h (four to five half-lives).",
        )
    if kind == "loading":
        vd_kg, target, weight = (
            rng.choice([0.2, 0.25, 0.5, 0.7, 1.0]),
            rng.choice([4, 10, 15, 20]),
            rng.choice([55, 62, 70, 80, 95]),
        )
        vd = vd_kg * weight
        return (
            "Calculate an intravenous loading dose.",
            f"Patient weight {weight} kg; volume of distribution {_fmt(vd_kg)} L/kg; target plasma concentration {target} mg/L.",
            f"Vd = {_fmt(vd_kg)} L/kg × {weight} kg = {_fmt(vd)} L. Loading dose = Vd × target concentration = {_fmt(vd)} L × {target} mg/L = {_fmt(vd * target)} mg.",
        )
    age, weight, scr, female = (
        rng.randint(28, 88),
        rng.choice([50, 58, 65, 72, 80, 90]),
        rng.choice([0.7, 0.9, 1.1, 1.4, 1.8, 2.5]),
        rng.random() < 0.5,
    )
    crcl = (140 - age) * weight / (72 * scr) * (0.85 if female else 1.0)
    sex = "female" if female else "male"
    factor = " × 0.85 (female)" if female else ""
    return (
        "Estimate creatinine clearance with the Cockcroft-Gault equation.",
        f"{sex.capitalize()}, {age} years, {weight} kg, serum creatinine {scr} mg/dL.",
        f"CrCl = (140 − age) × weight / (72 × SCr){factor} = (140 − {age}) × {weight} / (72 × {scr}){factor} = {crcl:.0f} mL/min.",
    )


def pk_extraction(rng: random.Random) -> tuple[str, str, str]:
    hl, sd, cl, tmax = (
        rng.uniform(2, 40),
        rng.uniform(0.5, 6),
        rng.uniform(1, 30),
        rng.choice(["0.5", "1.0", "1.5", "2.0", "4.0"]),
    )
    drug = rng.choice(DRUGS)[0]
    sentence = f"After a single oral dose of {drug}, median Tmax was {tmax} h, the mean terminal half-life was {hl:.1f} ± {sd:.1f} h and apparent clearance was {cl:.1f} L/h."
    return (
        "Extract the pharmacokinetic parameters from the sentence as a list.",
        sentence,
        f"- Tmax (median): {tmax} h\n- t1/2 (mean ± SD): {hl:.1f} ± {sd:.1f} h\n- CL/F (mean): {cl:.1f} L/h",
    )


def conclusion_task(rng: random.Random) -> tuple[str, str, str]:
    ctx = domain_context(rng)
    results = _section(rng, RESULTS, 3, ctx)
    conclusion = _section(rng, CONCLUSIONS, 1, ctx)
    return (
        rng.choice(
            [
                "Write a one-sentence conclusion for these study results.",
                "Summarize the main conclusion of the following results.",
            ]
        ),
        results,
        conclusion,
    )


def make_alpaca(rng: random.Random) -> list[dict]:
    records = []
    pairs = [(t, p) for t in GLOSSARY for p in DEFINE_PROMPTS]
    for term, prompt in rng.sample(pairs, 50):
        records.append({"instruction": prompt.format(term=term), "input": "", "output": GLOSSARY[term]})
    for kind, count in [("maintenance", 20), ("half_life", 20), ("loading", 15), ("crcl", 15)]:
        for _ in range(count):
            instruction, inp, out = calc_task(rng, kind)
            records.append({"instruction": instruction, "input": inp, "output": out})
    for _ in range(20):
        instruction, inp, out = pk_extraction(rng)
        records.append({"instruction": instruction, "input": inp, "output": out})
    for _ in range(30):
        instruction, inp, out = conclusion_task(rng)
        records.append({"instruction": instruction, "input": inp, "output": out})
    for pair in INTERACTION_PAIRS + rng.sample(INTERACTION_PAIRS, 10):
        question, answer = interaction_qa(rng, pair)
        records.append({"instruction": question, "input": "", "output": answer})
    rng.shuffle(records)
    return records


SYSTEM_PROMPTS = [
    "You are a clinical pharmacology assistant. Answer concisely and show calculations step by step.",
    "You are a helpful assistant for hospital pharmacists. Be precise about units.",
    "You help clinicians with drug dosing and pharmacokinetics. Recommend checking local guidelines for patient-specific decisions.",
]
MONITORING_FOLLOW_UP = (
    "What should we monitor?",
    "Monitor for signs of toxicity or loss of effect in the first two weeks, check renal and hepatic function, "
    "and measure drug concentrations where an assay exists. Review the dose again when the interacting drug is stopped.",
)


def make_chat(rng: random.Random) -> list[dict]:
    records = []
    for i in range(100):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
        kind = i % 4
        if kind == 0:
            term = rng.choice(sorted(GLOSSARY))
            messages += [
                {"role": "user", "content": rng.choice(DEFINE_PROMPTS).format(term=term)},
                {"role": "assistant", "content": GLOSSARY[term]},
            ]
        elif kind == 1:
            instruction, inp, out = calc_task(rng, rng.choice(["maintenance", "half_life", "loading", "crcl"]))
            messages += [{"role": "user", "content": f"{instruction} {inp}"}, {"role": "assistant", "content": out}]
        elif kind == 2:
            question, answer = interaction_qa(rng, rng.choice(INTERACTION_PAIRS))
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.5:
                messages += [
                    {"role": "user", "content": MONITORING_FOLLOW_UP[0]},
                    {"role": "assistant", "content": MONITORING_FOLLOW_UP[1]},
                ]
        else:
            instruction, inp, out = conclusion_task(rng)
            messages += [{"role": "user", "content": f"{instruction}\n\n{inp}"}, {"role": "assistant", "content": out}]
        records.append({"messages": messages})
    return records


# ---------------------------------------------------------------------------
# The reject-path file: one malformed record per line kind (see data/README.md)
# ---------------------------------------------------------------------------


def dirty_lines(rng: random.Random) -> list[tuple[str, bytes]]:
    def valid(line_no: int) -> bytes:
        text, meta = web_record(rng)
        record = {
            "doc_id": f"web-dirty-{line_no:02d}",
            "content": text,
            "url": meta["url"],
            "int_score": rng.randint(2, 5),
        }
        return json.dumps(record, ensure_ascii=False).encode("utf-8")

    def rec(line_no: int, **fields) -> bytes:
        return json.dumps({"doc_id": f"web-dirty-{line_no:02d}", **fields}, ensure_ascii=False).encode("utf-8")

    url = "https://www.example.com/post"
    return [
        ("valid", valid(1)),
        (
            "invalid_json_truncated",
            b'{"doc_id": "web-dirty-02", "content": "This record was cut off in the middle of a sent',
        ),
        ("valid", valid(3)),
        (
            "invalid_utf8",
            b'{"doc_id": "web-dirty-04", "content": "Caf\xe9 au lait and cr\xe8me br\xfbl\xe9e \xff\xfe at the corner bakery, written as Latin-1 bytes.", "url": "https://www.example.com/latin1", "int_score": 3}',
        ),
        ("missing_content", rec(5, url=url, int_score=3)),
        ("valid", valid(6)),
        ("empty_content", rec(7, content="", url=url, int_score=2)),
        ("whitespace_content", rec(8, content="   \n\t  \n ", url=url, int_score=2)),
        ("valid", valid(9)),
        ("content_number", rec(10, content=42, url=url, int_score=3)),
        ("content_list", rec(11, content=["first paragraph", "second paragraph"], url=url, int_score=3)),
        ("blank_line", b""),
        ("valid", valid(13)),
        (
            "json_array",
            b"["
            + rec(14, content="A record wrapped in a JSON array instead of an object.", url=url, int_score=3)
            + b"]",
        ),
        ("valid", valid(15)),
        (
            "invalid_json_trailing_comma",
            b'{"doc_id": "web-dirty-16", "content": "Trailing commas are not JSON.", "int_score": 3,}',
        ),
        ("valid", valid(17)),
        ("content_null", rec(18, content=None, url=url, int_score=1)),
        ("valid", valid(19)),
        ("json_string", json.dumps("A bare JSON string is valid JSON but not a record.").encode("utf-8")),
        (
            "invalid_json_python_repr",
            b"{'doc_id': 'web-dirty-21', 'content': 'Single quotes: a Python dict, not JSON.', 'int_score': 3}",
        ),
        ("valid", valid(22)),
        ("valid_no_trailing_newline", valid(23)),
    ]


# ---------------------------------------------------------------------------
# Writers: fixed key order, ensure_ascii=False, gzip with mtime=0 and no name
# ---------------------------------------------------------------------------


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_gzip(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(data)


def generate(out: Path) -> dict[str, dict[str, int]]:
    """Write every sample file under `out`; return {file: {kind: count}} for the summary."""
    summary: dict[str, dict[str, int]] = {}
    labels: list[dict] = []

    def count(name: str, docs: list) -> None:
        kinds: dict[str, int] = {}
        for kind, _, _ in docs:
            kinds[kind] = kinds.get(kind, 0) + 1
        summary[name] = kinds

    # Domain abstracts
    rng = random.Random(SEED)
    docs = build_corpus(rng, 1000, "domain", DOMAIN_DIRT, abstract_record)
    ids = [f"pharm-{i + 1:06d}" for i in range(len(docs))]
    records = [
        {"id": ids[i], "text": text, "journal": meta["journal"], "year": meta["year"]}
        for i, (_, text, meta) in enumerate(docs)
    ]
    write_bytes(out / "raw/domain/abstracts.jsonl", jsonl_bytes(records))
    count("raw/domain/abstracts.jsonl", docs)
    labels += [_label("raw/domain/abstracts.jsonl", ids, i, doc) for i, doc in enumerate(docs) if doc[0] != "clean"]

    # Domain guidelines: 38 unique, one exact copy under another name, one with page boilerplate
    rng = random.Random(SEED + 1)
    guidelines = [make_guideline(rng, n) for n in range(1, 39)]
    guidelines.append(("guideline-39-copy-of-07.txt", guidelines[6][1]))
    name, text = make_guideline(rng, 40)
    guidelines.append((name, add_boilerplate(rng, text)))
    for stale in sorted((out / "raw/domain/guidelines").glob("guideline-*.txt")):  # names follow the sampled drug
        stale.unlink()
    for name, text in guidelines:
        write_bytes(out / "raw/domain/guidelines" / name, text.encode("utf-8"))
    summary["raw/domain/guidelines/*.txt"] = {"clean": 38, "exact_duplicate": 1, "boilerplate": 1}
    labels.append(
        {
            "file": "raw/domain/guidelines/" + guidelines[38][0],
            "id": guidelines[38][0],
            "dirt": "exact_duplicate",
            "duplicate_of": guidelines[6][0],
        }
    )
    labels.append(
        {"file": "raw/domain/guidelines/" + guidelines[39][0], "id": guidelines[39][0], "dirt": "boilerplate"}
    )

    # General web text, split over two gzipped shards
    rng = random.Random(SEED + 2)
    docs = build_corpus(rng, 1800, "general", GENERAL_DIRT, web_record)
    scores = score_general(rng, docs)
    ids = [f"web-{i + 1:06d}" for i in range(len(docs))]
    records = []
    for i, (kind, text, meta) in enumerate(docs):
        url = meta["url"]
        if kind in ("exact_duplicate", "near_duplicate"):
            url = url.replace(url.split("/")[2], rng.choice(MIRROR_SITES))
        records.append({"doc_id": ids[i], "content": text, "url": url, "int_score": scores[i]})
    for shard in range(2):
        name = f"raw/general/web-{shard:03d}.jsonl.gz"
        write_gzip(out / name, jsonl_bytes(records[shard * 900 : (shard + 1) * 900]))
    count("raw/general/web-00[01].jsonl.gz", docs)
    summary["raw/general/web-00[01].jsonl.gz"]["int_score<=1"] = sum(s <= 1 for s in scores)
    labels += [
        _label(f"raw/general/web-{i // 900:03d}.jsonl.gz", ids, i, doc)
        for i, doc in enumerate(docs)
        if doc[0] != "clean"
    ]

    # Malformed lines for the reader's reject path
    rng = random.Random(SEED + 3)
    lines = dirty_lines(rng)
    write_bytes(out / "raw/general/web-002-dirty.jsonl", b"\n".join(line for _, line in lines))
    kinds: dict[str, int] = {}
    for kind, _ in lines:
        kinds[kind] = kinds.get(kind, 0) + 1
    summary["raw/general/web-002-dirty.jsonl"] = kinds

    # Instructions for SFT
    rng = random.Random(SEED + 4)
    alpaca = make_alpaca(rng)
    write_bytes(out / "instructions/alpaca.jsonl", jsonl_bytes(alpaca))
    chat = make_chat(rng)
    write_bytes(out / "instructions/chat.jsonl", jsonl_bytes(chat))
    summary["instructions/alpaca.jsonl"] = {"records": len(alpaca)}
    summary["instructions/chat.jsonl"] = {"records": len(chat)}

    write_bytes(out / "labels.jsonl", jsonl_bytes(labels))
    return summary


def _label(file: str, ids: list[str], i: int, doc: tuple) -> dict:
    kind, _, meta = doc
    label = {"file": file, "id": ids[i], "dirt": kind}
    if "duplicate_of" in meta:
        label["duplicate_of"] = ids[meta["duplicate_of"]]
    return label


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (default: data/)"
    )
    args = parser.parse_args(argv)
    summary = generate(args.out)
    for name, kinds in summary.items():
        total = sum(v for k, v in kinds.items() if k != "int_score<=1")
        print(f"{name}: {total} records")
        for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {kind:<28} {n:>5}")


if __name__ == "__main__":
    main()
