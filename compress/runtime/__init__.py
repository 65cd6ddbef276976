"""Cross-cutting helpers every stage uses: errors, Ctrl-C, device and precision, files and hashes."""
