"""`llmft annotate`: people's feedback on answers — rate, rank, pick, edit, compare blind — collected in a local web
page into an append-only annotations file, and exported into the files `llmft reward | dpo | kto | sft` read.

    items.py   candidates files (a prompt and K answers per line), built from `llmft generate` outputs
    store.py   the annotations file: checked, appended and fsync'ed one judgement at a time
    server.py  the page and its JSON API (loopback by default; a token elsewhere)
    export.py  judgements → training rows; agreement between people, position bias, blind win rates
    imports.py Label Studio and Argilla exports → a candidates file and an annotations file
"""
