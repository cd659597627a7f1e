"""Access control: who asks (authentication) and what they may see (rules).

- :mod:`acl.auth`, :mod:`acl.users`: user names and passcodes checked by a backend
  (the DICOM node's User Identity Negotiation is :mod:`archive.dimse.user_identity`).
- :mod:`acl.identity`: who an association acts for and how (user identity, AE title
  bound to address/certificate, anonymous), pure; warnings about broad mappings.
- :mod:`acl.throttle`: limits on failed authentications per peer and per user, with
  back-off (pure, clock-injected); wired by :class:`acl.auth.Guard`.
- :mod:`acl.rules`: rules (principal, service, dataset pattern), decisions (pure),
  the rulesets in MongoDB (``acl_rules``, ``acl_state``) and their atomic replacement.
- :mod:`acl.patterns`: dataset patterns, YAML text <-> DICOM JSON -> C-FIND filters.
- :mod:`acl.visibility`: what a restricted principal sees through C-FIND, computed keys
  included.
- :mod:`acl.yamlrules`: rules files, validated with line numbers, and their export.
- :mod:`acl.audit`: the ``audit`` collection and its background writer.
- :mod:`acl.cli`: ``archive acl apply | export | check`` and ``archive audit``
  (the command line registers them; acl imports no front end and not the command line).
"""
