"""What every stage shares: errors, files, vocabularies, records, progress, distributed runs."""
