"""Benchmark: the quality stage's language filter vs `langdetect.detect_langs` on the full text.

Generates deterministic English/German/French/Spanish documents (200-6000 characters) from sentence
templates, times both on one core in one process, and prints a table then one JSON line (last line).

    .venv/bin/python benchmarks/bench_language.py [--docs 2000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import langdetect  # noqa: E402
from langdetect import DetectorFactory  # noqa: E402

from cptflow.tasks.quality import LanguageConfig, _language_model, identify_language  # noqa: E402

DetectorFactory.seed = 0

# Per language: subjects, verbs (with object), objects, endings. Capitalised names and numbers are
# mixed in so that documents look like web or domain text, not only textbook sentences.
TEMPLATES = {
    "en": {
        "subjects": [
            "The committee",
            "Our research group",
            "The city council",
            "Many patients",
            "The new study",
            "A local company",
            "The hospital staff",
            "Most teachers",
            "The government",
            "Dr. Miller",
        ],
        "verbs": [
            "reviewed",
            "published",
            "discussed",
            "approved",
            "analysed",
            "described",
            "rejected",
            "presented",
            "measured",
            "compared",
        ],
        "objects": [
            "the annual report",
            "a new treatment plan",
            "the results of the trial",
            "the budget for 2024",
            "several important questions",
            "the effects of the drug",
            "a detailed proposal",
            "the data from 300 participants",
            "the safety of the procedure",
            "the long-term outcomes",
        ],
        "endings": [
            "after a long meeting.",
            "in the last quarter.",
            "with great care.",
            "before the deadline.",
            "because the evidence was strong.",
            "and shared it with the public.",
            "at the conference in Boston.",
            "although some members disagreed.",
            "for the first time.",
            "with support from the WHO.",
        ],
    },
    "de": {
        "subjects": [
            "Der Ausschuss",
            "Unsere Forschungsgruppe",
            "Der Stadtrat",
            "Viele Patienten",
            "Die neue Studie",
            "Ein lokales Unternehmen",
            "Das Krankenhauspersonal",
            "Die meisten Lehrer",
            "Die Regierung",
            "Frau Dr. Müller",
        ],
        "verbs": [
            "prüfte",
            "veröffentlichte",
            "diskutierte",
            "genehmigte",
            "analysierte",
            "beschrieb",
            "lehnte",
            "präsentierte",
            "maß",
            "verglich",
        ],
        "objects": [
            "den Jahresbericht",
            "einen neuen Behandlungsplan",
            "die Ergebnisse der Studie",
            "den Haushalt für 2024",
            "mehrere wichtige Fragen",
            "die Wirkung des Medikaments",
            "einen ausführlichen Vorschlag",
            "die Daten von 300 Teilnehmern",
            "die Sicherheit des Verfahrens",
            "die langfristigen Ergebnisse",
        ],
        "endings": [
            "nach einer langen Sitzung.",
            "im letzten Quartal.",
            "mit großer Sorgfalt.",
            "vor der Frist.",
            "weil die Beweise überzeugend waren.",
            "und teilte sie der Öffentlichkeit mit.",
            "auf der Konferenz in München.",
            "obwohl einige Mitglieder widersprachen.",
            "zum ersten Mal.",
            "mit Unterstützung der WHO.",
        ],
    },
    "fr": {
        "subjects": [
            "Le comité",
            "Notre groupe de recherche",
            "Le conseil municipal",
            "De nombreux patients",
            "La nouvelle étude",
            "Une entreprise locale",
            "Le personnel de l'hôpital",
            "La plupart des enseignants",
            "Le gouvernement",
            "Le docteur Dubois",
        ],
        "verbs": [
            "a examiné",
            "a publié",
            "a discuté",
            "a approuvé",
            "a analysé",
            "a décrit",
            "a rejeté",
            "a présenté",
            "a mesuré",
            "a comparé",
        ],
        "objects": [
            "le rapport annuel",
            "un nouveau plan de traitement",
            "les résultats de l'essai",
            "le budget pour 2024",
            "plusieurs questions importantes",
            "les effets du médicament",
            "une proposition détaillée",
            "les données de 300 participants",
            "la sécurité de la procédure",
            "les résultats à long terme",
        ],
        "endings": [
            "après une longue réunion.",
            "au dernier trimestre.",
            "avec beaucoup de soin.",
            "avant la date limite.",
            "parce que les preuves étaient solides.",
            "et l'a partagé avec le public.",
            "lors de la conférence à Lyon.",
            "bien que certains membres ne soient pas d'accord.",
            "pour la première fois.",
            "avec le soutien de l'OMS.",
        ],
    },
    "es": {
        "subjects": [
            "El comité",
            "Nuestro grupo de investigación",
            "El ayuntamiento",
            "Muchos pacientes",
            "El nuevo estudio",
            "Una empresa local",
            "El personal del hospital",
            "La mayoría de los profesores",
            "El gobierno",
            "La doctora García",
        ],
        "verbs": [
            "revisó",
            "publicó",
            "discutió",
            "aprobó",
            "analizó",
            "describió",
            "rechazó",
            "presentó",
            "midió",
            "comparó",
        ],
        "objects": [
            "el informe anual",
            "un nuevo plan de tratamiento",
            "los resultados del ensayo",
            "el presupuesto para 2024",
            "varias preguntas importantes",
            "los efectos del medicamento",
            "una propuesta detallada",
            "los datos de 300 participantes",
            "la seguridad del procedimiento",
            "los resultados a largo plazo",
        ],
        "endings": [
            "después de una larga reunión.",
            "en el último trimestre.",
            "con mucho cuidado.",
            "antes de la fecha límite.",
            "porque las pruebas eran sólidas.",
            "y lo compartió con el público.",
            "en la conferencia de Madrid.",
            "aunque algunos miembros no estaban de acuerdo.",
            "por primera vez.",
            "con el apoyo de la OMS.",
        ],
    },
}


def make_sentence(rng: random.Random, lang: str) -> str:
    t = TEMPLATES[lang]
    return f"{rng.choice(t['subjects'])} {rng.choice(t['verbs'])} {rng.choice(t['objects'])} {rng.choice(t['endings'])}"


def make_documents(n_docs: int, seed: int = 0) -> list[tuple[str, str]]:
    """(language, text) pairs; lengths drawn uniformly from 200-6000 characters, paragraphs of 3-6 sentences."""
    rng = random.Random(seed)
    langs = sorted(TEMPLATES)
    docs = []
    for i in range(n_docs):
        lang = langs[i % len(langs)]
        target = rng.randint(200, 6000)
        paragraphs, paragraph, length = [], [], 0
        while length < target:
            sentence = make_sentence(rng, lang)
            paragraph.append(sentence)
            length += len(sentence) + 1
            if len(paragraph) >= rng.randint(3, 6):
                paragraphs.append(" ".join(paragraph))
                paragraph = []
        if paragraph:
            paragraphs.append(" ".join(paragraph))
        docs.append((lang, "\n\n".join(paragraphs)))
    return docs


def full_text_langdetect(text: str) -> tuple[str, float]:
    try:
        probs = langdetect.detect_langs(text)
    except langdetect.LangDetectException:
        return "unknown", 0.0
    return probs[0].lang, probs[0].prob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000, help="number of documents (default 2000)")
    parser.add_argument("--quick", action="store_true", help="300 documents, for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_docs = 300 if args.quick else args.docs
    docs = make_documents(n_docs, args.seed)
    cfg = LanguageConfig()

    # Warm both (profile loading is a one-off per process, not per document).
    _language_model()
    full_text_langdetect("warm up the detector")

    start = time.perf_counter()
    ours = [identify_language(text, cfg) for _, text in docs]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = [full_text_langdetect(text) for _, text in docs]
    reference_s = time.perf_counter() - start

    long_docs = [i for i, (_, text) in enumerate(docs) if len(text) >= 200]
    agreement = sum(ours[i][0] == reference[i][0] for i in long_docs) / max(len(long_docs), 1)
    ours_acc = sum(ours[i][0] == docs[i][0] for i in range(n_docs)) / n_docs
    ref_acc = sum(reference[i][0] == docs[i][0] for i in range(n_docs)) / n_docs
    ours_rate, ref_rate = n_docs / ours_s, n_docs / reference_s
    mean_chars = sum(len(t) for _, t in docs) / n_docs

    print(f"{n_docs} documents (en/de/fr/es), mean {mean_chars:.0f} characters, 1 process")
    print(f"{'detector':<34}{'docs/s':>10}{'accuracy':>10}")
    print(f"{'ours (naive Bayes, 1200-char sample)':<34}{ours_rate:>10.1f}{ours_acc:>10.4f}")
    print(f"{'langdetect.detect_langs full text':<34}{ref_rate:>10.1f}{ref_acc:>10.4f}")
    print(f"speedup {ours_rate / ref_rate:.1f}x, top-language agreement on >=200-char docs {agreement:.4f}")
    print(
        json.dumps(
            {
                "benchmark": "language_filter",
                "docs": n_docs,
                "ours_docs_per_s": round(ours_rate, 1),
                "langdetect_full_docs_per_s": round(ref_rate, 1),
                "speedup": round(ours_rate / ref_rate, 2),
                "agreement_ge_200_chars": round(agreement, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
