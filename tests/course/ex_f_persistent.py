# IV.F Mise en place d'une session persistante -- adapted: host/port/credentials
# from argv. With a client id and clean_session=False the broker keeps the
# subscription and the QoS 1 messages published while we are away.
#   --subscribe: subscribe to isima/GX at QoS 1, then disconnect;
#   --count N:   reconnect (same id) and print the N messages missed meanwhile.
import paho.mqtt.client as mqtt

import common

def extra(p):
    p.add_argument("--client-id", default="my_ID")
    p.add_argument("--subscribe", action="store_true")
    p.add_argument("--count", type=int, default=0)

a = common.args("F: persistent session", extra)
MQTT_CLIENT_ID = a.client_id
MQTT_CLEAR_SESSION = False
received = 0

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => " + mqtt.connack_string(rc))
    print("session present: " + str(flags.get("session present")))
    if a.subscribe:
        client.subscribe("isima/" + a.gx, qos=1)
    elif a.count == 0:
        client.disconnect()

def on_subscribe(client, userdata, mid, granted_qos):
    print("Subscribed: " + str(mid) + " " + str(granted_qos))
    client.disconnect()

def on_message(client, userdata, msg):
    global received
    print("Received message '" + str(msg.payload) + "' on topic '" + msg.topic + "' with QoS "
          + str(msg.qos))
    received += 1
    if received >= a.count:
        client.disconnect()

client = mqtt.Client(client_id=MQTT_CLIENT_ID,clean_session=MQTT_CLEAR_SESSION)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.username_pw_set(username=a.username, password=a.password)
client.connect(a.host, a.port)
client.loop_forever()
