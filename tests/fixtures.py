"""Small raw files in the shapes of all eleven ECG-Expert-QA files (see SCHEMAS.md), written by us.

The text is synthetic: the dataset itself has no license and never enters the repository.
``write_raw(folder)`` writes every file; ``SHAPES`` maps each task to its items so tests can pick.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.data.raw import TASKS

# Ten generic ECG facts reused to give each QA file enough items to split.
FACTS = [
    ("What does the P wave represent on an ECG?", "The P wave represents atrial depolarization."),
    ("What is the normal duration of the QRS complex?", "A normal QRS complex lasts 80-120 ms."),
    ("What is the normal PR interval?", "The normal PR interval is 120-200 ms, or 0.12-0.20 s."),
    ("What heart rate defines sinus tachycardia?", "Sinus tachycardia is a sinus rhythm faster than 100 bpm."),
    ("What does ST-segment elevation suggest?", "ST-segment elevation suggests acute myocardial injury such as a STEMI."),
    ("What is a prolonged QTc in women?", "In women a QTc above 460 ms is considered prolonged."),
    ("What is atrial fibrillation on an ECG?", "Atrial fibrillation shows an irregularly irregular rhythm without P waves."),
    ("What do peaked T waves indicate?", "Peaked T waves often indicate hyperkalemia."),
    ("What is first-degree AV block?", "First-degree AV block is a PR interval longer than 200 ms."),
    ("What does a delta wave indicate?", "A delta wave indicates pre-excitation, as in Wolff-Parkinson-White syndrome."),
]


# Distinct endings, so that items sharing a template are not near-duplicates of each other on their answer
# (the split keeps near-duplicate answers on one side).
ENDINGS = ["as taught in the first lecture", "according to the ward protocol", "which the cardiologist confirmed",
           "noted on the morning round", "in the clinic's written guidance", "per the hospital's patient leaflet",
           "after the nurse checked the file", "following the regional guideline", "as stated in the discharge letter",
           "recorded by the duty physician"]


def _qa(prefix: str, tail: str = "") -> list[dict]:
    return [{"Q": f"{q[:-1]} ({prefix} {i})?", "A": a[:-1] + tail + "."} for i, (q, a) in enumerate(FACTS)]


def shapes() -> dict[str, list[dict]]:
    ebk = _qa("basic")
    ebk.append({"Q": "What does the heart鈥檚 conduction system do?",  # recoverable mojibake: ’s
                "A": "It carries the impulse that sets the heart鈥檚 rhythm."})
    ebk.append({"Q": "When is left ventricular hypertrophy suspected?",  # unrecoverable mojibake
                "A": "When SV1 + RV5 is 鈮 35 mm."})
    ck = _qa("cardio", ", a point every cardiology trainee learns early")
    ck.append({"Q": "  What   is   heart failure?  ", "A": "Heart failure is   the heart's inability to pump enough blood.\u200b"})
    ck.append({"Q": "Which imaging is preferred for the left atrial appendage?", "A": "TEE is preferred over"})  # cut off
    cd = [{"Disease": f"Disease {i}", "Q": f"What ECG changes appear in disease {i} (case {i})?",
           "A": f"Disease {i} shows T-wave inversions and a QTc of {440 + i} ms."} for i in range(10)]
    pp = [{"medical_advice": f"You have atrial fibrillation (note {i}); take apixaban twice daily.",
           "Q": f"How often should I come back for a check-up, doctor (visit {i})?",
           "A": f"Come back every {i % 3 + 1} months for an ECG and blood tests, {ENDINGS[i]}."} for i in range(10)]
    prtk = [{"Question": f"Can I ask for a copy of my ECG report (request {i})?",
             "Answer": f"Yes, you have the right to a copy of your ECG report, {ENDINGS[i]}."} for i in range(10)]
    prtk.append(dict(prtk[0]))  # exact duplicate
    prtk.append({"Question": "May I refuse the ECG?", "Answer": "Yes, you may refuse any test."})
    prtk.append({"Question": "May I refuse the ECG?", "Answer": "No, the test is mandatory."})  # contradiction
    prtk.append({"Question": "Must my ECG be shared with my employer?", "Answer": "No, not without your consent."})
    cmd = [{"Q": f"The rhythm is sinus bradycardia at {50 + i} bpm.",  # swapped upstream: Q holds the answer
            "A": f"What is the diagnosis for this ECG (record {i})?",
            "subject_id": 1000 + i, "study_id": 5000 + i, "report_0": "Sinus bradycardia",
            "report_1": "Otherwise normal ECG", "rr_interval": 1100 + i, "qrs_axis": 29999, "p_axis": 45}
           for i in range(10)]
    gra = [{"subject_id": 2000 + i, "result": f"ECG {i}: atrial fibrillation, QTc 470 ms, age {60 + i}.",
            "RA": {"risk": "high", "advice": f"Anticoagulation advised (patient {i})."} if i % 2 else
            f"Moderate stroke risk; follow-up in {i + 1} weeks (patient {i})."} for i in range(10)]
    ltd = [{"subject_id": 3000 + i, "result": f"Sinus rhythm, left bundle branch block (patient {i}).",
            "QA": ([{"Q": f"What conduction disorder is present (patient {i})?", "A": "Left bundle branch block."},
                    {"Q": f"Is the rhythm sinus (patient {i})?", "A": "Yes, the rhythm is sinus."}] if i % 2 else
                   {"1": {"Question": f"What is the QRS width likely to be (patient {i})?",
                          "Answer": "Above 120 ms, as in any complete bundle branch block."}})}
           for i in range(10)]
    mrod = [{"subject_id": 4000 + i, "result": f"Palpitations; ECG shows PVCs (patient {i}).",
             "QA": [{"Q": f"Doctor, my heart skips beats (patient {i}). Is it dangerous?",
                     "A": "Occasional premature ventricular contractions are usually benign."},
                    {"Q": "Should I stop drinking coffee?", "A": "Cutting caffeine often reduces them."}]}
            for i in range(10)]
    mee = [{"subject_id": 6000 + i, "result": f"Sinus tachycardia at {110 + i} bpm with ST depression.",
            "keywords": ["sinus tachycardia", "ST depression"] if i % 2 else "sinus tachycardia; ST depression"}
           for i in range(10)]
    mc = [{"subject_id": 7000 + i, "result": f"Atrial flutter with 2:1 block (patient {i}).",
           "Conversation": {"opening": [{"patient": f"I was told I have atrial fibrillation (patient {i})."},
                                        {"doctor": "Let me look at your ECG."}],
                            "correction": [{"patient": "Sorry, I meant atrial flutter."},
                                           {"doctor": "Thank you; your ECG indeed shows atrial flutter."}]}}
          for i in range(10)]
    return {"EBK": ebk, "CK": ck, "CD": cd, "PP": pp, "PRTK": prtk, "CMD": cmd, "GRA": gra, "LTD": ltd,
            "MROD": mrod, "MEE": mee, "MC": mc}


def write_raw(folder: Path, tasks=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task, items in shapes().items():
        if tasks and task not in tasks:
            continue
        (folder / TASKS[task].file).write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder
