"""Parses a /metrics body with prometheus_client's text-format parser (which
raises on anything malformed) and prints {family: {partition: value}} as JSON.
Histograms report their _count sample; families without a partition label
are keyed by "".

    python parse_metrics.py METRICS_FILE
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        text = f.read()
    out = {}
    for family in text_string_to_metric_families(text):
        values = out.setdefault(family.name, {})
        for sample in family.samples:
            if family.type == "histogram" and not sample.name.endswith("_count"):
                continue
            if family.type == "summary" and not sample.name.endswith("_count"):
                continue
            partition = sample.labels.get("partition", "")
            value = sample.value
            values[partition] = int(value) if float(value).is_integer() else value
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
