"""Working examples of every extension point (see README "Extension points")."""
