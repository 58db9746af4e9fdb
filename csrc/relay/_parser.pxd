# Declarations of the SMTP command parser (parser.pyx).

cdef class Command:
    cdef readonly str verb                # upper-case verb
    cdef readonly str argument            # text after the verb, outer spaces stripped

    # MAIL and RCPT
    cdef readonly object path             # str address, "" for <>; None for other verbs
    cdef readonly object local_part       # str before the unquoted "@", or None
    cdef readonly object domain           # str after it (domain or [literal]), or None
    cdef readonly dict params             # upper-case keyword -> raw value or None

    # ESMTP parameters, decoded
    cdef readonly object size             # int or None
    cdef readonly object body             # "7BIT" | "8BITMIME" | "BINARYMIME" | None
    cdef readonly bint smtputf8
    cdef readonly object ret              # "FULL" | "HDRS" | None
    cdef readonly object envid            # str or None
    cdef readonly object auth             # str or None
    cdef readonly object notify           # tuple of str or None
    cdef readonly object orcpt            # (address type, address) or None

    # BDAT
    cdef readonly object chunk_size       # int or None
    cdef readonly bint last

    # AUTH
    cdef readonly object mechanism        # str or None
    cdef readonly object initial_response # str or None
