"""Parses Prometheus text exposition with the Prometheus project's own Python client.

Usage: metrics_parse.py < METRICS_TEXT

Prints a JSON list of samples: {"family", "type", "name", "labels", "value"}. Exits 1
with the parser's error on stderr if the text does not parse.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    samples = []
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.append(
                    {
                        "family": family.name,
                        "type": family.type,
                        "name": sample.name,
                        "labels": dict(sample.labels),
                        "value": sample.value,
                    }
                )
    except Exception as error:  # the parser raises ValueError and others
        print(f"metrics do not parse: {error}", file=sys.stderr)
        return 1
    json.dump(samples, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
