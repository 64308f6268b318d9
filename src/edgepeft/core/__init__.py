"""Types, errors, config serialisation and seeding. Imports nothing else of edgepeft."""
