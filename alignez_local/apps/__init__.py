"""What users run: the chat session and the command line."""
